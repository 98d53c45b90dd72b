"""Foreign networks (torchvision, timm, a user's callable) as dkel backbones: where they split,
that every tail is independent, that the deployed network is the original network again, and
that every method, the engine and export take them."""
from __future__ import annotations

import inspect
import json
import sys

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.efficientnet import MBConvConfig
from torchvision.models.regnet import BlockParams
from torchvision.models.resnet import Bottleneck

from conftest import make_config
from dkel import models, runtime
from dkel.config import TimeScale
from dkel.engine import Stepper, train
from dkel.errors import ConfigError
from dkel.methods import METHODS, Setup

timm = pytest.importorskip("timm")  # the `test` extra installs it
# torchvision's notice when GoogLeNet is built without weights (the bad-input case below)
pytestmark = pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet")


SIZE, CLASSES = 32, 3


# tiny members of the families whose named networks take seconds to build on a CPU
def tiny_resnext(num_classes):
    return tvm.ResNet(Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=num_classes)


def tiny_efficientnet(num_classes):
    stages = [MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(6, 3, 2, 8, 16, 1), MBConvConfig(6, 3, 2, 16, 24, 1),
              MBConvConfig(6, 3, 1, 24, 32, 1)]
    return tvm.EfficientNet(stages, dropout=0.2, num_classes=num_classes)


def tiny_convnext(num_classes):
    stages = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)]
    return tvm.ConvNeXt(stages, num_classes=num_classes)


def tiny_regnet(num_classes):
    return tvm.RegNet(BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=1.7, group_width=8),
                      num_classes=num_classes)


def tiny_vit(num_classes, image_size=224):
    return tvm.VisionTransformer(image_size, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64,
                                 num_classes=num_classes)


def tiny_swin(num_classes):  # a transformer stack per stage, channels last: no automatic split
    return tvm.SwinTransformer([4, 4], 8, [2, 2], [1, 1], [2, 2], num_classes=num_classes)


def tiny_timm_convnext(num_classes):
    return timm.create_model("convnext_atto", num_classes=num_classes, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))


def tiny_deit(num_classes, image_size=224):
    return timm.create_model("deit_tiny_patch16_224", num_classes=num_classes, img_size=image_size, patch_size=8,
                             embed_dim=32, depth=4, num_heads=2)


def original(spec, num_classes=CLASSES, size=SIZE):
    """The network exactly as its library builds it."""
    if callable(spec):
        return spec(num_classes, image_size=size) if "image_size" in inspect.signature(spec).parameters \
            else spec(num_classes)
    source, name = spec.split(":")
    if source == "torchvision":
        return tvm.get_model(name, num_classes=num_classes, weights=None)
    return timm.create_model(name, num_classes=num_classes, **({"img_size": size} if "vit" in name else {}))


FAMILIES = [  # (spec, the first module of the tail)
    ("torchvision:resnet18", "layer4"),
    (tiny_resnext, "layer4"),  # WRN is this class too (width_per_group=128)
    ("torchvision:mobilenet_v2", "features.14"),
    ("torchvision:mobilenet_v3_small", "features.9"),
    (tiny_efficientnet, "features.3"),
    (tiny_convnext, "features.6"),
    (tiny_regnet, "trunk_output.block4"),
    (tiny_vit, "encoder.layers.encoder_layer_3"),
    ("timm:resnet10t", "layer4"),
    ("timm:mobilenetv3_small_050", "blocks.4"),
    ("timm:mobilenetv2_050", "blocks.5"),
    ("timm:tinynet_e", "blocks.5"),  # an EfficientNet
    (tiny_timm_convnext, "stages.3"),
    ("timm:regnetx_002", "s4"),
    ("timm:vit_tiny_patch16_224", "blocks.9"),
    (tiny_deit, "blocks.3"),
]


def family_id(case):
    return case if isinstance(case, str) else getattr(case, "__name__", None)


def first_module(tail):
    return next(n.target for n in tail.graph.nodes if n.op == "call_module")


def tensor_ids(module):
    return {id(t) for t in [*module.parameters(), *module.buffers()]}


@pytest.mark.parametrize("spec,split", FAMILIES, ids=[family_id(s) for s, _ in FAMILIES])
def test_family_splits_and_deploys_as_the_original_network(spec, split):
    torch.manual_seed(0)
    net = models.create_branched(spec, CLASSES, peers=2, ensemble_head=True, image_size=SIZE).eval()
    assert [first_module(t) for t in net.tails] == [split, split]
    # every tail has weights of its own, and none is the trunk's
    assert not tensor_ids(net.tails[0]) & tensor_ids(net.tails[1])
    assert not tensor_ids(net.trunk) & (tensor_ids(net.tails[0]) | tensor_ids(net.tails[1]))
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net(x)
        assert out.features.shape == (2, 2, net.feature_dim)
        assert models.pool_trunk(out.trunk[0]).shape == (2, net.trunk_channels)
        reference = original(spec).eval()
        for peer in (1, 2):  # numbered from 1
            deployed = net.deploy(peer).eval()
            assert torch.equal(deployed(x), out.logits[peer - 1])
            # the plain network again: the library's own parameter names, loadable into its own class
            assert list(deployed.state_dict()) == list(reference.state_dict())
            reference.load_state_dict(deployed.state_dict())
            assert torch.equal(reference(x), out.logits[peer - 1])


def test_tails_start_from_fresh_initialisations_of_the_network():
    torch.manual_seed(0)
    net = models.create_branched("torchvision:resnet18", CLASSES, peers=2, ensemble_head=False)
    a, b = (dict(t.named_parameters()) for t in net.tails)
    assert not torch.equal(a["layer4.0.conv1.weight"], b["layer4.0.conv1.weight"])
    torch.manual_seed(0)
    reference = tvm.resnet18(num_classes=CLASSES)
    assert torch.equal(a["fc.weight"], reference.fc.weight)  # the first tail is the built network's own


def test_create_is_the_library_network_under_the_same_seed():
    torch.manual_seed(3)
    ours = models.create("torchvision:resnet18", CLASSES).eval()
    torch.manual_seed(3)
    theirs = tvm.resnet18(num_classes=CLASSES).eval()
    assert type(ours).__name__ == "ResNet" and ours.dkel_model == "torchvision:resnet18"
    # the whole state dict loads into a fresh torchvision resnet18, strictly
    fresh = tvm.resnet18(num_classes=CLASSES).eval()
    fresh.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x)) and torch.equal(fresh(x), theirs(x))


def test_deployed_resnet18_of_a_branched_model_loads_into_torchvision_resnet18():
    net = models.create_branched("torchvision:resnet18", CLASSES, peers=2, ensemble_head=False).eval()
    state = net.deploy(2).state_dict()
    assert "layer4.0.conv1.weight" in state and "fc.weight" in state
    fresh = tvm.resnet18(num_classes=CLASSES).eval()
    fresh.load_state_dict(state)  # strict
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x).logits[1])


def test_explicit_split_for_any_sequential_enough_network():
    def plain(num_classes):  # only the stem has a stride: nothing says where a last stage starts
        return nn.Sequential(nn.Conv2d(3, 8, 3, 2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    with pytest.raises(ConfigError, match=r"cannot tell where the last stage of .*plain starts; pass split=NAME, "
                                          r"the first module of the tail, one of: 1, 2, 3, 4$"):
        models.backbone(plain, CLASSES)
    b = models.backbone(plain, CLASSES, split="2")
    assert (b.trunk_channels, b.feature_dim) == (8, 8)
    assert first_module(b.make_tail()) == "2"
    deeper = models.backbone("torchvision:resnet18", CLASSES, split="layer3.1")
    assert first_module(deeper.make_tail()) == "layer3.1" and deeper.trunk_channels == 256


def test_the_pooled_feature_is_the_classifier_input_before_dropout():
    def with_dropout(num_classes):
        return nn.Sequential(nn.Conv2d(3, 8, 3, 2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, num_classes))

    net = models.create_branched(with_dropout, CLASSES, peers=1, ensemble_head=False, split="2").train()
    x = torch.randn(4, 3, SIZE, SIZE)
    assert torch.equal(net(x).features, net(x).features)  # training-mode dropout acts after the feature
    assert not torch.equal(net(x).logits, net(x).logits)


def test_the_whole_network_is_the_tail_of_a_cohort_member():
    cohort = models.create_cohort(["resnet8", "torchvision:mobilenet_v3_small"], CLASSES, peers=2, image_size=SIZE)
    net = cohort.nets[1]
    assert first_module(net.tail) == "features" and not list(net.trunk.parameters())
    x = torch.randn(2, 3, SIZE, SIZE)
    cohort.eval()
    with torch.no_grad():
        logits = cohort(x).logits
        assert isinstance(cohort.deploy(1), models.SingleNet) and cohort.deploy(1).dkel_model == "resnet8"
        assert cohort.deploy(2).dkel_model == "torchvision:mobilenet_v3_small"
        for peer in (1, 2):
            assert torch.equal(cohort.deploy(peer).eval()(x), logits[peer - 1])


def test_torchvision_network_takes_other_channel_counts_and_sizes():
    b = models.backbone("torchvision:resnet18", CLASSES, in_channels=1, image_size=8)
    x = torch.randn(2, 1, 8, 8)
    assert b.make_tail()(b.trunk(x))[0].shape == (2, CLASSES)
    assert b.trunk.conv1.in_channels == 1


def test_vit_is_built_for_the_data_size_or_fails_clearly():
    b = models.backbone("timm:vit_tiny_patch16_224", CLASSES, image_size=SIZE)
    assert b.trunk(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, 1 + (SIZE // 16) ** 2, 192)  # cls + patch tokens
    with pytest.raises(ConfigError, match=r"^torchvision:vit_b_16 cannot be built for 8x8 images: .*patch size"):
        models.backbone("torchvision:vit_b_16", CLASSES, image_size=8)


def test_a_network_that_cannot_take_the_datasets_images_says_so():
    """A 3-channel network on 1-channel images: naming a split would not help, so the error must not
    suggest one; it names the images the network was given."""
    def rgb_only(num_classes):
        return nn.Sequential(nn.Conv2d(3, 8, 3, 2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, num_classes))

    with pytest.raises(ConfigError, match=r"rgb_only cannot run on this dataset's images \(a batch of 1-channel "
                                          r"\d+x\d+ images: .*channels.*\); it must accept such images$"):
        models.backbone(rgb_only, CLASSES, in_channels=1)


def test_a_registered_network_is_split_at_its_registered_split():
    def strided(num_classes):
        return nn.Sequential(nn.Conv2d(3, 8, 3, 2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    models.register_callable("strided_test_net", strided, "test", split="2")
    try:
        net = models.create_branched("strided_test_net", CLASSES, peers=2)
        assert first_module(net.tails[0]) == "2" and net.deploy(1).dkel_model == "strided_test_net"
        assert first_module(models.create_branched("strided_test_net", CLASSES, peers=2, split="1").tails[0]) == "1"
    finally:
        models.MODELS.unregister("strided_test_net")
    with pytest.raises(ConfigError, match=r"^model 'python:strided' was given to dkel.fit as a Python object"):
        models.resolve("python:strided")


def test_imported_module_attribute(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "import torchvision\n"
        "def small(num_classes):\n"
        "    return torchvision.models.shufflenet_v2_x0_5(num_classes=num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = models.create("my_nets:small", CLASSES, image_size=SIZE)
    assert net.dkel_model == "my_nets:small" and "fc.weight" in net.state_dict()
    assert first_module(models.backbone("my_nets:small", CLASSES, image_size=SIZE).make_tail()) == "stage4"
    with pytest.raises(ConfigError, match=r"^model 'my_nets:large': module 'my_nets' has no attribute 'large'$"):
        models.resolve("my_nets:large")
    with pytest.raises(ConfigError, match=r"^model 'no_such_module:f': cannot import 'no_such_module'"):
        models.resolve("no_such_module:f")
    monkeypatch.delitem(sys.modules, "my_nets")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,pattern", [
    (lambda: models.backbone(lambda c: "a network", CLASSES), r"must return an nn.Module; it returned a str$"),
    (lambda: models.backbone(tvm.resnet18(), CLASSES), r"^model ResNet is a network; pass what builds it"),
    (lambda: models.backbone(lambda c: tvm.resnet18(num_classes=7), CLASSES, image_size=SIZE),
     r"outputs \[2, 7\] for a batch of 2, not \[2, 3\] logits$"),
    (lambda: models.backbone("torchvision:resnet18", CLASSES, split="layer9"),
     r"^torchvision:resnet18 has no module 'layer9'; pass split=NAME, the first module of the tail, one of: "
     r"bn1, relu, maxpool, layer1, layer1.1, layer2, layer2.1, layer3, layer3.1, layer4, layer4.1, avgpool$"),
    (lambda: models.backbone("torchvision:resnet18", CLASSES, split="layer4.0.conv2"),
     r"^cannot split torchvision:resnet18 at 'layer4.0.conv2': the layers from there on use more than one value"),
    (lambda: models.backbone(tiny_swin, CLASSES, image_size=SIZE), r"^cannot tell where the last stage of tiny_swin"),
    (lambda: models.backbone("torchvision:googlenet", CLASSES, split="inception5a"),
     r"forward takes another path in training than in evaluation"),
    (lambda: models.backbone("torchvision:squeezenet1_0", CLASSES, split=""), r"does not end in an nn.Linear"),
    (lambda: models.resolve("torchvision:resnet19"),
     r"^unknown torchvision model 'resnet19' \(did you mean 'resnet18'\?\); see torchvision.models.list_models"),
    (lambda: models.resolve("timm:vit_tiny_patch16"), r"^unknown timm model 'vit_tiny_patch16' \(did you mean"),
    (lambda: models.resolve("resnet9"), r"^unknown model 'resnet9'.*valid: resnet8, resnet14"),
    (lambda: models.resolve("resnet8", split="layer3"), r"^split applies to torchvision:, timm: and imported"),
    (lambda: models.create_branched(["resnet8", "resnet8"], CLASSES, peers=2),
     r"only the whole-network methods \(independent, dml, kdcl\) take"),
    (lambda: models.create_cohort(["resnet8", "resnet8"], CLASSES, peers=3), r"^model lists 2 networks for 3 peers"),
])
def test_bad_models_are_one_line_errors(call, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        call()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- methods
def step(method_name, model, peers=2, **values):
    cfg = make_config(method=method_name, model=model, peers=peers, device="cpu", **values)
    torch.manual_seed(0)
    method = METHODS.get(method_name)(cfg, Setup(model, CLASSES, 3, peers, 10, 10, TimeScale(), image_size=SIZE))
    views = torch.randn(method.view_count(method.cfg), 4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    out = Stepper(cfg, method, runtime.setup("cpu", "fp32", False))(views, torch.arange(4) % CLASSES, epoch=1)
    assert torch.isfinite(out.losses["loss"]) and out.logits.shape == (4, CLASSES)
    assert all(p.grad is not None for p in method.student.parameters() if p.requires_grad)
    method.eval()
    x = views[0]
    with torch.no_grad():
        deployed = method.deploy().eval()(x)
        assert any(torch.allclose(deployed, o, atol=1e-5) for o in method.eval_logits(x).values())
    return method


@pytest.mark.parametrize("method", ["dkel", "pcl", "cl", "one", "okddip"])
def test_every_branched_method_steps_on_a_torchvision_network(method):
    m = step(method, "torchvision:resnet18")
    if method == "one":  # the gate reads resnet18's layer3 output, the attention its pooled layer4 feature
        assert m.student.gate[0].in_features == 256
    if method == "okddip":
        assert m.student.query.in_features == 512


def test_timm_vit_steps_with_dkel():
    m = step("dkel", "timm:vit_tiny_patch16_224")
    assert m.student.feature_dim == m.student.trunk_channels == 192


def test_one_gate_pools_vit_tokens():
    m = step("one", "test_adapters:tiny_vit")
    assert m.student.gate[0].in_features == 32  # the token width, pooled over the tokens


# ----------------------------------------------------------------------------- engine and export
def test_mixed_dml_cohort_trains_and_exports_the_deployed_member(tmp_path):
    from dkel.export import export_run

    cfg = make_config(method="dml", model=["torchvision:shufflenet_v2_x0_5", "resnet8"], peers=2, epochs=1,
                      train_subset=100, batch_size=50, runs_dir=str(tmp_path), device="cpu")
    result = train(cfg)
    run = tmp_path / "digits" / "dml-torchvision-shufflenet_v2_x0_5+resnet8" / "default-seed0"
    assert json.loads((run / "results.json").read_text()) == result
    assert {"peer1", "peer2"} <= set(result["metrics"])
    path, diff = export_run(run, "safetensors")
    assert json.loads(path.with_name(path.name + ".json").read_text())["model"] == "torchvision:shufflenet_v2_x0_5"


def test_list_model_config_is_checked():
    with pytest.raises(ConfigError, match=r"^model lists 2 networks for peers=3; give one per peer$"):
        make_config(method="dml", model=["resnet8", "resnet8"])
    with pytest.raises(ConfigError, match="split applies to branched methods"):
        make_config(method="dml", model=["resnet8", "resnet8"], peers=2, split="layer4")


def write_noise_folder(root, classes=3, n=4, size=16):
    """train/ and val/ folders of random RGB images (solid colours would leave BatchNorm no variance)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", n), ("val", 2)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")


def test_adapted_run_exports_to_every_format(tmp_path):
    from safetensors.torch import load_file

    from dkel.export import export_run

    write_noise_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    train(make_config(method="one", model="torchvision:shufflenet_v2_x0_5", peers=2, epochs=1, batch_size=4, lr=0.01,
                      dataset="imagefolder", data_dir=str(tmp_path / "imgs"), out=str(run), device="cpu"))
    for fmt in ("safetensors", "torchscript", "onnx"):  # each file is loaded back and checked against the run
        assert export_run(run, fmt)[0].is_file()
    meta = json.loads((run / "export" / "deploy.safetensors.json").read_text())
    assert meta["model"] == "torchvision:shufflenet_v2_x0_5"
    fresh = tvm.shufflenet_v2_x0_5(num_classes=CLASSES).eval()
    fresh.load_state_dict(load_file(str(run / "export" / "deploy.safetensors")))  # strict: the library's names
    x = torch.randn(2, 3, 16, 16)
    from dkel.engine import restore

    deployed = restore(run)[1].deploy().eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), deployed(x))
