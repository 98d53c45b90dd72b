"""Model zoo: `create` gives a plain network, `create_branched` / `create_cohort` the multi-peer ones,
`pack_peers` packs the multi-peer ones inside a method."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Union

import torch
from torch import nn

from ..errors import ConfigError, DkelError
from ..registry import Registry
from .core import Backbone, Branched, Cohort, PeerOutputs, SingleNet, Tail
from .densenet import densenet_bc
from .packing import NotPackable
from .resnet import CIFAR_RESNETS, TINY_RESNETS
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


# device type -> whether packed=auto packs there: whichever was faster (docs/performance.md)
PACK_BY_DEFAULT = {"cuda": True, "cpu": False}


def pack_peers(root: nn.Module, packed: Union[str, bool], device: torch.device, sync_bn: bool = False) -> bool:
    """Pack every Branched and Cohort of more than one peer inside `root`; returns whether it did.

    packed="auto" packs where that is faster (PACK_BY_DEFAULT) and every module is packable;
    True packs or raises a DkelError naming what cannot be packed; False leaves all as they are."""
    containers = [m for m in root.modules() if isinstance(m, (Branched, Cohort)) and m.peers > 1]
    if packed is False or not containers or (packed == "auto" and not PACK_BY_DEFAULT.get(device.type, False)):
        return False
    try:
        if sync_bn:
            raise NotPackable("sync_bn would merge the statistics of the views a packed trunk keeps apart")
        for container in containers:
            container.check_packable()
    except NotPackable as e:
        if packed is True:
            raise DkelError(f"packed=true: {e}") from None
        return False
    for container in containers:
        container.pack()
    return True


def _check_peers(peers: int) -> None:
    if peers < 1:
        raise ConfigError(f"peers must be >= 1, got {peers}")


__all__ = ["MODELS", "Backbone", "Branched", "Cohort", "NotPackable", "PeerOutputs", "SingleNet", "Tail",
           "backbone", "create", "create_branched", "create_cohort", "pack_peers"]
