"""Models: `create` gives a plain network, `create_branched` / `create_cohort` the multi-peer ones,
`pack_peers` packs the multi-peer ones inside a method.

A model specification is a zoo name (see `dkel list`), "torchvision:NAME", "timm:NAME",
"package.module:attribute" naming a callable num_classes -> nn.Module, or such a callable;
`resolve` is the one place it becomes a backbone factory, so the multi-peer containers and
the methods never know where a backbone came from (foreign networks: models/adapters.py).
A deployed network built from a string carries it as `dkel_model`, what `create` rebuilds it from."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..errors import ConfigError, DkelError
from ..registry import Registry, unknown_name_message
from . import adapters
from .core import Backbone, Branched, Cohort, PeerOutputs, SingleNet, Tail, pool_trunk
from .densenet import densenet_bc
from .packing import NotPackable
from .resnet import CIFAR_RESNETS, IMAGENET_RESNETS, TINY_RESNETS
from .vgg import vgg16


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: a zoo `factory` (num_classes, in_channels) -> Backbone, or a user's
    `network` num_classes -> nn.Module, split like a torchvision one (at `split`, or automatically)."""

    factory: Optional[Callable[..., Backbone]]
    input_size: int  # the resolution the architecture was designed for
    network: Optional[Callable[..., nn.Module]] = None
    split: Optional[str] = None


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


PYTHON_PREFIX = "python:"  # networks handed to dkel.fit as objects: they live only in that process


def register_callable(name: str, fn: Callable[..., nn.Module], description: str, input_size: int = 32,
                      split: Optional[str] = None, *, replace: bool = False) -> ModelSpec:
    """Model `name` from fn(num_classes) -> nn.Module (also given in_channels= and image_size= if it
    names them); branched methods split it at module `split`, or where its last stage starts."""
    adapters.callable_network(fn, name)  # a network instance or a non-callable fails here, not at training
    spec = ModelSpec(None, input_size, fn, split)
    if replace:
        MODELS.unregister(name)
    MODELS.register(name, description)(spec)
    return spec


BackboneFactory = Callable[[int, int], Backbone]  # (num_classes, in_channels) -> Backbone


def resolve(model: Any, split: Optional[str] = None, image_size: Optional[int] = None) -> BackboneFactory:
    """The backbone factory of one model specification.

    split: the first tail module of a foreign network (None: where its last stage starts; "": the
    whole network is the tail).  image_size: the data's, for networks built for one size (ViT)."""
    if callable(model):
        label = getattr(model, "__qualname__", None) or type(model).__name__
        return adapters.Adapter(label, adapters.callable_network(model, label), split, image_size)
    if not isinstance(model, str):
        raise ConfigError(f"a model is a name or a callable num_classes -> nn.Module, not a {type(model).__name__}")
    if model in MODELS:
        entry = MODELS.get(model)
        if entry.network is not None:
            network = adapters.callable_network(entry.network, model)
            return _rebuildable(adapters.Adapter(model, network, entry.split if split is None else split,
                                                 image_size), model)
        if split:
            raise ConfigError(f"split applies to torchvision:, timm: and imported networks; zoo model {model!r} "
                              f"has its own")
        return _rebuildable(entry.factory, model)
    if model.startswith(PYTHON_PREFIX):
        raise ConfigError(f"model {model!r} was given to dkel.fit as a Python object, which only that process "
                          f"holds; pass it again from Python, or give dkel.fit an importable function")
    source, sep, name = model.partition(":")
    if not sep:
        raise ConfigError(unknown_name_message("model", model, MODELS.names()))
    sources = {"torchvision": adapters.torchvision_network, "timm": adapters.timm_network}
    network = sources[source](name) if source in sources else adapters.imported_network(model)
    return _rebuildable(adapters.Adapter(model, network, split, image_size), model)


def _rebuildable(factory: BackboneFactory, model: str) -> BackboneFactory:
    def build(num_classes: int, in_channels: int = 3) -> Backbone:
        b = factory(num_classes, in_channels)
        return dataclasses.replace(b, assemble=partial(_tagged, b.assemble, model))

    return build


def _tagged(assemble: Callable[[nn.Module, nn.Module], nn.Module], model: str, trunk: nn.Module,
            tail: nn.Module) -> nn.Module:
    net = assemble(trunk, tail)
    net.dkel_model = model
    return net


def specs(model: Any) -> list[Any]:
    """The specifications in `model`: one per peer for a list, else the one."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def check_spec(model: Any, split: Optional[str] = None) -> None:
    """Look every name in `model` up, so that an unknown one fails before any data is read."""
    for spec in specs(model):
        resolve(spec, split if not isinstance(model, (list, tuple)) else "")


def _build(factory: BackboneFactory, num_classes: int, in_channels: int) -> Backbone:
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(f"model needs num_classes >= 1 and in_channels >= 1, got {num_classes}, {in_channels}")
    return factory(num_classes, in_channels)


def backbone(model: Any, num_classes: int, in_channels: int = 3, *, split: Optional[str] = None,
             image_size: Optional[int] = None) -> Backbone:
    return _build(resolve(model, split, image_size), num_classes, in_channels)


def create(model: Any, num_classes: int, in_channels: int = 3, *, image_size: Optional[int] = None) -> nn.Module:
    """A plain single network, as a method deploys it (a foreign one under its own layer names)."""
    b = backbone(model, num_classes, in_channels, split="", image_size=image_size)
    return b.assemble(b.trunk, b.make_tail())


def create_branched(model: Any, num_classes: int, peers: int = 3, ensemble_head: bool = True,
                    in_channels: int = 3, *, split: Optional[str] = None, image_size: Optional[int] = None,
                    **options) -> Branched:
    """One trunk, `peers` independent tails, optional peer-ensemble head (options: see Branched)."""
    _check_peers(peers)
    if isinstance(model, (list, tuple)):
        raise ConfigError(f"model is a list of {len(model)} networks, one per peer, which only the whole-network "
                          f"methods (independent, dml, kdcl) take; this method shares one trunk between its peers")
    b = backbone(model, num_classes, in_channels, split=split, image_size=image_size)
    return Branched(b, num_classes, peers, ensemble_head, **options)


def create_cohort(model: Any, num_classes: int, peers: int = 3, in_channels: int = 3, *,
                  image_size: Optional[int] = None) -> Cohort:
    """`peers` fully independent networks: `peers` of one model, or one per entry of a list."""
    _check_peers(peers)
    wanted = specs(model) if isinstance(model, (list, tuple)) else [model] * peers
    if len(wanted) != peers:
        raise ConfigError(f"model lists {len(wanted)} networks for {peers} peers; give one per peer")
    factories = [resolve(spec, "", image_size) for spec in wanted]  # every name is checked before any is built
    return Cohort([_build(f, num_classes, in_channels) for f in factories])


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


__all__ = ["MODELS", "PYTHON_PREFIX", "Backbone", "BackboneFactory", "Branched", "Cohort", "ModelSpec", "NotPackable",
           "PeerOutputs", "SingleNet", "Tail", "backbone", "check_spec", "create", "create_branched", "create_cohort",
           "pack_peers", "pool_trunk", "register_callable", "resolve", "specs"]
