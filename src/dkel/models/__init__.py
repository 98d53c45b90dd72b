"""Model zoo: `create` gives a plain network, `create_branched` / `create_cohort` the multi-peer ones."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from ..errors import ConfigError
from ..registry import Registry
from .core import Backbone, Branched, Cohort, PeerOutputs, SingleNet, Tail
from .densenet import densenet_bc
from .resnet import CIFAR_RESNETS, IMAGENET_RESNETS, TINY_RESNETS
from .vgg import vgg16


@dataclass(frozen=True)
class ModelSpec:
    factory: Callable[..., Backbone]
    input_size: int  # the resolution the architecture was designed for


MODELS: Registry[ModelSpec] = Registry("model")

_DESCRIPTIONS = {
    "resnet8": "CIFAR ResNet-8 (1 BasicBlock per stage), small CPU member",
    "resnet14": "CIFAR ResNet-14 (2 BasicBlocks per stage), small CPU member",
    "resnet20": "CIFAR ResNet-20 (3 BasicBlocks per stage)",
    "resnet32": "CIFAR ResNet-32 (5 BasicBlocks per stage)",
    "resnet110": "CIFAR ResNet-110 (12 Bottlenecks per stage)",
    "wrn20_8": "WRN-20-8 (2 Bottlenecks per stage, inner width 8x)",
}
for _name, _factory in CIFAR_RESNETS.items():
    MODELS.register(_name, _DESCRIPTIONS[_name])(ModelSpec(_factory, 32))
MODELS.register("vgg16", "VGG-16 with BatchNorm, FC 512-512-C")(ModelSpec(vgg16, 32))
MODELS.register("densenet40_12", "DenseNet-BC 40, growth 12")(ModelSpec(partial(densenet_bc), 32))
MODELS.register("resnet18", "ResNet-18 for 64x64 (7x7 stride-2 stem, no max-pool)")(
    ModelSpec(TINY_RESNETS["resnet18"], 64))
MODELS.register("resnet34", "ResNet-34 for 64x64 (7x7 stride-2 stem, no max-pool)")(
    ModelSpec(TINY_RESNETS["resnet34"], 64))
MODELS.register("resnet18_imagenet", "ImageNet ResNet-18 for 224x224 (7x7 stride-2 stem + max-pool)")(
    ModelSpec(IMAGENET_RESNETS["resnet18_imagenet"], 224))
MODELS.register("resnet34_imagenet", "ImageNet ResNet-34 for 224x224 (7x7 stride-2 stem + max-pool)")(
    ModelSpec(IMAGENET_RESNETS["resnet34_imagenet"], 224))


def backbone(name: str, num_classes: int, in_channels: int = 3) -> Backbone:
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(f"model needs num_classes >= 1 and in_channels >= 1, got {num_classes}, {in_channels}")
    return MODELS.get(name).factory(num_classes, in_channels)


def create(name: str, num_classes: int, in_channels: int = 3) -> SingleNet:
    """A plain single network (trunk + one tail)."""
    b = backbone(name, num_classes, in_channels)
    return SingleNet(b.trunk, b.make_tail())


def create_branched(name: str, num_classes: int, peers: int = 3, ensemble_head: bool = True,
                    in_channels: int = 3, **options) -> Branched:
    """One trunk, `peers` independent tails, optional peer-ensemble head (options: see Branched)."""
    _check_peers(peers)
    return Branched(backbone(name, num_classes, in_channels), num_classes, peers, ensemble_head, **options)


def create_cohort(name: str, num_classes: int, peers: int = 3, in_channels: int = 3) -> Cohort:
    """`peers` fully independent networks."""
    _check_peers(peers)
    MODELS.get(name)
    return Cohort(lambda: backbone(name, num_classes, in_channels), peers)


def _check_peers(peers: int) -> None:
    if peers < 1:
        raise ConfigError(f"peers must be >= 1, got {peers}")


__all__ = ["MODELS", "Backbone", "Branched", "Cohort", "PeerOutputs", "SingleNet", "Tail", "backbone",
           "create", "create_branched", "create_cohort"]
