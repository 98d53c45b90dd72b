"""Packed peers compute what the unpacked networks compute, keep their checkpoints' layout, and
fall back (or fail clearly) where a module cannot be packed."""
import dataclasses
from typing import Optional

import pytest
import torch
from torch import nn

from conftest import make_config
from dkel import engine, models
from dkel.config import TimeScale
from dkel.engine import Stepper, build_method, load_checkpoint, train
from dkel.errors import ConfigError, DkelError
from dkel.methods import METHODS, Setup
from dkel.models import Backbone, Branched, Cohort, Tail, pack_peers
from dkel.models.packing import GroupedLinear, ViewBatchNorm2d
from dkel.runtime import Runtime

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, with tensors of norm below 1e-3 compared absolutely (a conv bias before a
    BatchNorm gets a gradient of exactly 0 plus rounding noise, 1e-14 in float64)."""
    if not b.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-3)).item()


def assert_rel(a: dict, b: dict, tol: float, what: str, floor: Optional[dict] = None) -> None:
    """Every tensor of `a` within `tol` of `b`, or, where rounding alone moves it more (`floor`:
    the same tensors computed another equivalent way), within 10x that."""
    assert list(a) == list(b), what
    for k in a:
        limit = max(tol, 10 * rel_err(floor[k], b[k])) if floor is not None else tol
        assert rel_err(a[k], b[k]) <= limit, f"{what}: {k} differs by {rel_err(a[k], b[k]):.2e} > {limit:.2e}"


# (packed, channels_last): the unpacked reference, the packed network, and the unpacked network in NCHW,
# whose distance from the reference is the fp32 rounding floor (ResNet-110 at initialisation amplifies
# rounding to ~1e-4 in its logits; zero-initialised parameters are all update after one step, and their
# gradients, sums with cancellation, differ by up to 1e-2 between two layouts)
BUILDS = ((False, True), (True, True), (False, False))
# In fp32 one ReLU input within rounding of 0 (seen: -1.8e-7 in a DenseNet) can fall on the other side in
# one computation, which moves the gradients behind it by ~1e-3 and a BatchNorm bias after one step by
# ~5e-3; the float64 tests check the step exactly instead.
STEP_TOLERANCE_FP32 = 2e-2


def batch(method, peers, size=16, b=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    views = METHODS.get(method).view_count(make_config(method=method, peers=peers))
    x = torch.randn(views, b, size, size, 3, generator=g, dtype=dtype).permute(0, 1, 4, 2, 3)  # channels-last
    return x, torch.randint(0, 10, (b,), generator=g)


def recording(outputs: dict):
    """A runner wrapper that keeps the training-mode logits the method's student returned."""
    def wrap(run):
        def recorded(x):
            out = run(x)
            peers = getattr(out, "peers", out)  # OKDDip returns its peers' outputs inside its own
            outputs.update(logits=peers.logits.detach().clone(), **(
                {"ensemble": peers.ensemble.detach().clone()} if peers.ensemble is not None else {}))
            return out
        return recorded
    return wrap


# input sizes whose smallest feature maps still hold a few values per view (BatchNorm over 2 values is so
# ill-conditioned that even float64 results of two equivalent computations differ)
INPUT_SIZE = {"vgg16": 32, "resnet18": 32, "resnet34": 32, "resnet18_imagenet": 64, "resnet34_imagenet": 64}


def one_step_each(method, model="resnet8", dtype=torch.float32, builds=BUILDS, peers=3, evaluate=False):
    """For each of `builds` of the same method (same seed), on inputs of INPUT_SIZE (default 16):
    (training logits and loss, BatchNorm buffers and parameters after one prepared optimiser step,
    and the eval outputs after it if `evaluate`)."""
    cfg = make_config(method=method, model=model, peers=peers)
    setup = Setup(model, 10, 3, peers, cfg.epochs, 10, TimeScale())
    views, labels = batch(method, peers, INPUT_SIZE.get(model, 16), dtype=dtype)
    results = []
    for packed, channels_last in builds:
        rt = Runtime(torch.device("cpu"), torch.float32, channels_last=channels_last)
        torch.manual_seed(0)
        m = build_method(dataclasses.replace(cfg, packed=packed), setup, rt).to(dtype)
        assert any(getattr(c, "packed", False) for c in m.modules()) == packed
        if not channels_last:
            views = views.contiguous()
        m.prepare(iter([(views, labels)]))  # DKEL: the teacher's own SGD steps
        trained: dict = {}
        m.wrap("student", recording(trained))
        trained["loss"] = Stepper(cfg, m, rt)(views, labels, epoch=2).losses["loss"].detach()
        state = m.state_dict()
        buffers = {k for k in state if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}
        outputs = {}
        if evaluate:
            m.eval()
            with torch.no_grad():
                outputs = m.eval_logits(views[0])
        results.append((trained, {k: v for k, v in state.items() if k in buffers},
                        {k: v for k, v in state.items() if k not in buffers}, outputs))
    return results


def assert_equivalent(results, tol, step_tol=None):
    """Packed (results[1]) against unpacked (results[0]): forward outputs and BatchNorm buffers within
    `tol`, parameters after the step and eval outputs within `step_tol` (default `tol`), each or within
    10x the distance of a third, equivalent computation (results[2]) where there is one."""
    reference, packed, *other = results
    for i, what in enumerate(("training logits and loss", "BatchNorm buffers after one step",
                              "parameters after one step", "eval outputs after one step")):
        limit = tol if i < 2 else step_tol or tol
        assert_rel(packed[i], reference[i], limit, what, other[0][i] if other else None)


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_packed_equals_unpacked(method):
    assert_equivalent(one_step_each(method, evaluate=True), 1e-5, STEP_TOLERANCE_FP32)


# every model as branched peers (CL: shared trunk, grouped tails); the small ones also as a cohort
# (independent), which groups the same module types; the methods' own parts (heads, gates, attention,
# teachers) are covered on resnet8 above
MODEL_CASES = [("cl", m) for m in models.MODELS.names()] + [
    ("independent", m) for m in ("resnet14", "resnet20", "resnet32", "densenet40_12")]


@pytest.mark.parametrize("method,model", MODEL_CASES)
def test_every_model_packed_equals_unpacked(method, model):
    assert_equivalent(one_step_each(method, model, peers=2), 1e-5, STEP_TOLERANCE_FP32)


@pytest.mark.parametrize("method,model", MODEL_CASES)
def test_every_model_packed_equals_unpacked_in_float64(method, model):
    """float64 leaves only the arithmetic: packed must match to 1e-8, the optimiser step included.  The
    .to(float64) after packing also replaces the BatchNorm buffers the packed trunk keeps as views."""
    assert_equivalent(one_step_each(method, model, torch.float64, BUILDS[:2], peers=2), 1e-8)


def test_containers_pack_with_the_unpacked_state_dict_layout():
    for make in (lambda: models.create_branched("resnet8", 10, 3), lambda: models.create_cohort("densenet40_12", 10, 3)):
        torch.manual_seed(0)
        plain, packed = make(), make()
        packed.load_state_dict(plain.state_dict())  # same weights, built independently
        packed.pack()
        a, b = plain.state_dict(), packed.state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert a._metadata.keys() == b._metadata.keys()
        assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in packed.parameters())
        assert len(list(packed.parameters())) < len(list(plain.parameters()))
        # both ways: a packed network loads an unpacked state and the other way round, bitwise
        shifted = {k: v + 1 if v.is_floating_point() else v + 1 for k, v in a.items()}
        packed.load_state_dict(shifted)
        assert all(torch.equal(packed.state_dict()[k], shifted[k]) for k in a)
        plain.load_state_dict(packed.state_dict())
        assert all(torch.equal(plain.state_dict()[k], shifted[k]) for k in a)


@pytest.mark.parametrize("make", [lambda: models.create_branched("densenet40_12", 10, 3),
                                  lambda: models.create_cohort("vgg16", 10, 3)])
def test_deploy_of_a_packed_peer_is_the_plain_network(make):
    torch.manual_seed(0)
    net = make()
    net.train()(torch.randn(3, 4, 3, 32, 32))  # running statistics away from their initial values
    plain = [net.deploy(i + 1) for i in range(3)]
    net.pack()
    x = torch.randn(5, 3, 32, 32)
    for i in range(3):
        single = net.deploy(i + 1).eval()
        assert all(torch.equal(a, b) for a, b in zip(single.state_dict().values(), plain[i].state_dict().values()))
        assert not any(isinstance(m, (ViewBatchNorm2d, GroupedLinear)) for m in single.modules())
        assert all(t._base is None for t in single.state_dict(keep_vars=True).values())  # storage of its own
        with torch.no_grad():
            torch.testing.assert_close(single(x), plain[i].eval()(x))


def foreign_backbone() -> Backbone:
    """A backbone with a module type the packer does not know (as an adapted torchvision/timm network has)."""
    def make_tail():
        return Tail(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.SiLU()), nn.Linear(8, 10))

    return Backbone(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)), make_tail, 8, 8)


def test_unknown_module_types_fall_back_under_auto_and_fail_under_true():
    cuda = torch.device("cuda")  # where auto would pack (only the device type is read)
    net = Branched(foreign_backbone(), 10, 3, ensemble_head=True)
    assert pack_peers(net, "auto", cuda) is False and not net.packed
    with pytest.raises(DkelError, match=r"^packed=true: cannot pack module type torch\.nn\.modules\.activation\.SiLU"):
        pack_peers(net, True, cuda)
    assert not net.packed
    cohort = Cohort([foreign_backbone() for _ in range(3)])
    assert pack_peers(cohort, "auto", cuda) is False
    with pytest.raises(DkelError, match="SiLU"):
        pack_peers(cohort, True, torch.device("cpu"))
    mixed = Cohort([models.backbone(name, 10) for name in ("resnet8", "resnet14")])  # a mixed cohort
    assert pack_peers(mixed, "auto", cuda) is False and not mixed.packed
    with pytest.raises(DkelError, match="the cohort's peers are different networks"):
        pack_peers(mixed, True, cuda)
    zoo = models.create_branched("resnet8", 10, 3)
    assert pack_peers(zoo, "auto", cuda) and zoo.packed
    assert pack_peers(models.create_branched("resnet8", 10, 3), "auto", torch.device("cpu")) is False
    with pytest.raises(DkelError, match="sync_bn"):
        pack_peers(models.create_branched("resnet8", 10, 3), True, cuda, sync_bn=True)


def test_packed_must_be_auto_true_or_false():
    assert make_config(packed=True).packed is True and make_config().packed == "auto"
    with pytest.raises(ConfigError, match="packed must be auto, true or false"):
        make_config(packed="sometimes")


# ----------------------------------------------------------------------------- resuming across packing
@pytest.mark.parametrize("method", ["dkel", "kdcl"])
@pytest.mark.parametrize("first", [True, False])
def test_checkpoint_state_converts_losslessly_between_packed_and_unpacked(method, first):
    """What a run saves (method and Stepper state, momenta included) loads bitwise into the other
    packing, and the next step there matches the next step of the run that saved it."""
    cfg = make_config(method=method, peers=3)
    setup = Setup("resnet8", 10, 3, 3, cfg.epochs, 10, TimeScale())
    rt = Runtime(torch.device("cpu"), torch.float32, channels_last=True)
    views, labels = batch(method, 3)
    torch.manual_seed(0)
    saver = build_method(dataclasses.replace(cfg, packed=first), setup, rt)
    stepper = Stepper(cfg, saver, rt)
    for epoch in range(2):  # momenta that are not zero
        stepper(views, labels, epoch)
    method_state, stepper_state = saver.state_dict(), stepper.state_dict()
    loader = build_method(dataclasses.replace(cfg, packed=not first), setup, rt)
    resumed = Stepper(cfg, loader, rt)
    loader.load_state_dict(method_state)
    resumed.load_state_dict(stepper_state)
    assert [torch.equal(a, b) for a, b in zip(loader.state_dict().values(), method_state.values())] == \
           [True] * len(method_state)
    again = resumed.state_dict()
    momenta = [s["momentum_buffer"] for s in stepper_state["optimizer"]["state"].values()]
    assert [torch.equal(a["momentum_buffer"], b) for a, b in zip(again["optimizer"]["state"].values(), momenta)] \
           == [True] * len(momenta) and again["step"] == stepper_state["step"] == 2
    assert again["optimizer"]["param_groups"] == stepper_state["optimizer"]["param_groups"]
    outs = [s(views, labels, 2).losses["loss"].detach() for s in (stepper, resumed)]
    assert rel_err(outs[1], outs[0]) < 1e-5
    assert_rel(loader.state_dict(), saver.state_dict(), STEP_TOLERANCE_FP32, "state after the next step")


def test_a_packed_run_resumes_unpacked_through_the_engine(tmp_path, monkeypatch):
    values = dict(method="dkel", epochs=2, batch_size=50, train_subset=200, threads=2)
    train(make_config(**values, packed=True, out=str(tmp_path / "whole")))
    cut = tmp_path / "cut"
    calls = {"n": 0}
    evaluate = engine.evaluate

    def dying(*args, **kwargs):  # dies before the second epoch's checkpoint, as a killed run would
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(**values, packed=True, out=str(cut)))
    monkeypatch.setattr(engine, "evaluate", evaluate)
    assert load_checkpoint(cut / "checkpoints" / "last.pt")["epoch"] == 0
    train(make_config(**values, packed=False, out=str(cut)), resume=cut)
    a, b = (load_checkpoint(p / "checkpoints" / "last.pt") for p in (tmp_path / "whole", cut))
    assert a["epoch"] == b["epoch"] == 1 and a["stepper"]["step"] == b["stepper"]["step"] == 8
    assert list(a["method"]) == list(b["method"])
    # four steps of training apart in packing only: rounding, not a lost momentum or a swapped peer
    assert_rel(b["method"], a["method"], 2e-2, "weights and buffers")


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("make", [lambda: models.create_branched("resnet8", 10, 3, in_channels=1),
                                  lambda: models.create_cohort("densenet40_12", 10, 3, in_channels=1)])
def test_packed_forward_in_either_memory_format_and_on_one_channel_images(make, channels_last):
    """NCHW activations (channels_last=false) and single-channel inputs (the digits) take other
    layout paths than the channels-last RGB the tests above use; float64 leaves only the arithmetic."""
    torch.manual_seed(0)
    plain = make().double()
    packed = make().double()
    packed.load_state_dict(plain.state_dict())
    packed.pack()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 4, 1, 8, 8, dtype=torch.float64)
    for net in (plain, packed):
        net.to(memory_format=fmt)
    for inputs in (x, x[0]):  # one view per peer, and one view shared by all
        a, b = plain(inputs), packed(inputs)
        assert rel_err(b.logits, a.logits) < 1e-10 and rel_err(b.features, a.features) < 1e-10
    assert_rel(packed.state_dict(), plain.state_dict(), 1e-10, "running statistics")
