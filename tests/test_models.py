import pytest
import torch

from dkel import models
from dkel.models import MODELS

# SPEC section 6: (model, classes) -> trunk, one tail, ensemble head, student total, deploy
SPEC_COUNTS = {
    ("resnet32", 10): (112_592, 354_314, 1_930, 1_177_464, 466_906),
    ("resnet32", 100): (112_592, 360_164, 19_300, 1_212_384, 472_756),
    ("resnet110", 100): (275_280, 895_588, 76_900, 3_038_944, 1_170_868),
    ("wrn20_8", 100): (1_629_776, 5_241_444, 76_900, 17_431_008, 6_871_220),
    ("vgg16", 100): (7_640_640, 7_659_108, 153_700, 30_771_664, 15_299_748),
    ("densenet40_12", 100): (115_848, 72_244, 39_700, 372_280, 188_092),
    ("resnet18", 200): (2_782_784, 8_496_328, 307_400, 28_579_168, 11_279_112),
    ("resnet34", 200): (8_170_304, 13_216_968, 307_400, 48_128_608, 21_387_272),
}


# ImageNet ResNets with 1000 classes: trunk, one tail, ensemble head, student total, deploy; the deployed
# network has torchvision's parameter count (11,689,512 and 21,797,672)
IMAGENET_COUNTS = {
    "resnet18_imagenet": (2_782_784, 8_906_728, 1_537_000, 31_039_968, 11_689_512),
    "resnet34_imagenet": (8_170_304, 13_627_368, 1_537_000, 50_589_408, 21_797_672),
}


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name,classes", list(SPEC_COUNTS))
def test_parameter_counts_equal_spec(name, classes):
    net = models.create_branched(name, classes, peers=3, ensemble_head=True)
    got = (count(net.trunk), count(net.tails[0]), count(net.head), count(net), count(net.deploy(1)))
    assert got == SPEC_COUNTS[name, classes]
    assert count(models.create(name, classes)) == SPEC_COUNTS[name, classes][4]


@pytest.mark.parametrize("name", list(IMAGENET_COUNTS))
def test_imagenet_resnet_parameter_counts(name):
    import torchvision

    net = models.create_branched(name, 1000, peers=3, ensemble_head=True)
    got = (count(net.trunk), count(net.tails[0]), count(net.head), count(net), count(net.deploy(1)))
    assert got == IMAGENET_COUNTS[name]
    reference = getattr(torchvision.models, name.split("_")[0])(num_classes=1000)
    assert count(models.create(name, 1000)) == count(reference)
    # the max-pool halves the stem's output: 224 -> 112 (stem) -> 56 (pool), as torchvision's layer1 sees it
    assert net.trunk[:4](torch.zeros(1, 3, 224, 224)).shape[-1] == 56


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_forward_backward_at_its_input_size(name):
    size = MODELS.get(name).input_size
    net = models.create_branched(name, 7, peers=2)
    views = torch.randn(2, 2, 3, size, size)
    out = net(views)
    assert out.logits.shape == (2, 2, 7) and out.ensemble.shape == (2, 7)
    assert out.features.shape == (2, 2, net.feature_dim)
    (out.logits.sum() + out.ensemble.sum()).backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("name", MODELS.names())
def test_small_grayscale_inputs_work(name):
    """The embedded digits are 8x8x1: every backbone must accept them."""
    net = models.create(name, 10, in_channels=1).eval()
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("name", ["resnet8", "vgg16", "densenet40_12"])
def test_deploy_matches_peer(name):
    torch.manual_seed(0)
    net = models.create_branched(name, 5, peers=3)
    x = torch.randn(4, 3, 32, 32)
    net.train()
    net(torch.randn(3, 8, 3, 32, 32))  # move BN running statistics away from their init
    net.eval()
    peers = net(x).logits
    for i in range(3):
        single = net.deploy(i + 1).eval()
        torch.testing.assert_close(single(x), peers[i], rtol=0, atol=1e-5)
        assert count(single) == count(models.create(name, 5))


def test_cohort_peers_are_independent_networks():
    torch.manual_seed(0)
    cohort = models.create_cohort("resnet8", 4, peers=3).eval()
    x = torch.randn(5, 3, 32, 32)
    logits = cohort(x).logits
    assert not torch.allclose(logits[0], logits[1])
    torch.testing.assert_close(cohort.deploy(3).eval()(x), logits[2])
    assert count(cohort) == 3 * count(models.create("resnet8", 4))


def test_tails_have_independent_weights():
    net = models.create_branched("resnet8", 10, peers=2)
    w0, w1 = (t.classifier.weight for t in net.tails)
    assert w0.data_ptr() != w1.data_ptr() and not torch.equal(w0, w1)


def test_per_peer_views_reach_their_tail():
    net = models.create_branched("resnet8", 3, peers=2).eval()
    a, b = torch.randn(2, 4, 3, 32, 32)
    out = net(torch.stack([a, b]))
    torch.testing.assert_close(out.logits[1], net.deploy(2).eval()(b), rtol=0, atol=1e-5)


def test_unknown_model_lists_valid_ones():
    from dkel.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model 'resnet33'.*did you mean.*resnet32"):
        models.create("resnet33", 10)
