"""Trunk/tail networks and the two multi-peer containers every method builds on.

A backbone is split into a *trunk* (stem and every stage but the last) and a *tail*
(last stage, global pooling, classifier).  A plain network is trunk + one tail; a
branched model shares one trunk between K tails; a cohort is K whole networks.  Where a
backbone came from (the zoo, torchvision, timm, a user's module) is the backbone's own
business: its `assemble` says how one trunk and one tail become the deployed network.
Both multi-peer containers can be *packed* (`pack()`, see packing.py): the same
outputs and state_dict, computed by one grouped network instead of K.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses import scale_grad
from .packing import NotPackable, PackedPeers, PerViewNorms, check_packable, packable, plain_norms


@packable
class Tail(nn.Module):
    """Last stage -> pooled feature -> classifier; returns (logits, feature).

    Packed (groups = K peers): grouped input [B, K*C, H, W] -> logits [K, B, classes] and
    features [K, B, d]."""

    groups = 1

    def __init__(self, stage: nn.Module, classifier: nn.Module):
        super().__init__()
        self.stage = stage
        self.classifier = classifier

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature = self.stage(x).mean(dim=(2, 3))
        if self.groups > 1:
            feature = feature.view(feature.shape[0], self.groups, -1).transpose(0, 1)
        return self.classifier(feature), feature


def pool_trunk(h: Tensor) -> Tensor:
    """[B, C] from a trunk output: feature maps [B, C, H, W] averaged over space, token
    sequences [B, N, D] over the tokens, already pooled [B, C] as they are."""
    if h.dim() == 4:
        return h.mean(dim=(2, 3))
    if h.dim() == 3:
        return h.mean(dim=1)
    if h.dim() == 2:
        return h
    raise ValueError(f"cannot pool a trunk output of shape {tuple(h.shape)}")


@packable
class SingleNet(nn.Module):
    """A plain network: trunk + one tail, returning logits."""

    def __init__(self, trunk: nn.Module, tail: Tail):
        super().__init__()
        self.trunk = trunk
        self.tail = tail

    def forward(self, x: Tensor) -> Tensor:
        return self.tail(self.trunk(x))[0]


@dataclass
class Backbone:
    """What a model factory returns: a trunk and a way to make independent tails.

    make_tail returns a module mapping the trunk output to (logits [B, C], pooled feature [B, d]).
    assemble(trunk, tail) is the plain network a user deploys (adapted foreign networks give
    back their own layer names instead of SingleNet's trunk./tail.)."""

    trunk: nn.Module
    make_tail: Callable[[], nn.Module]
    feature_dim: int  # width of a tail's pooled feature
    trunk_channels: int  # width of the trunk's output after pool_trunk
    assemble: Callable[[nn.Module, nn.Module], nn.Module] = SingleNet


class PeerOutputs(NamedTuple):
    logits: Tensor  # [K, B, C]
    features: Optional[Tensor]  # [K, B, d] pooled tail features (None: a cohort of different widths)
    ensemble: Optional[Tensor]  # [B, C] from the peer-ensemble head, if any
    trunk: Optional[Sequence[Tensor]]  # branched models: the trunk output of each view (packed: [V, B, C, H, W])


def shared_view(x: Tensor, views: int) -> bool:
    """True for one view shared by all peers ([B, C, H, W]), False for `views` views ([V, B, C, H, W])."""
    if x.dim() == 4:
        return True
    if x.shape[0] != views:
        raise ValueError(f"got {x.shape[0]} views for a model that takes {views}")
    return False


def views_of(x: Tensor, views: int) -> list[Tensor]:
    """One view per peer ([V, B, C, H, W]) or one view shared by all ([B, C, H, W])."""
    return [x] if shared_view(x, views) else list(x.unbind(0))


def grouped(views: Tensor, index: list[int]) -> Tensor:
    """Stacked views [V, B, C, H, W] -> peer-major grouped input [B, K*C, H, W] of the K peers
    reading views[i] for i in index, in the views' memory format (one copy)."""
    v, b, c, h, w = views.shape
    if index != list(range(v)):
        views = views.expand(len(index), -1, -1, -1, -1) if v == 1 else views[index]
    if views.stride(2) == 1 and c > 1:  # channels-last views
        return views.permute(1, 3, 4, 0, 2).reshape(b, h, w, -1).permute(0, 3, 1, 2)
    return views.transpose(0, 1).reshape(b, -1, h, w)


def peer_index(peer: int, peers: int) -> int:
    """0-based index of the 1-based peer number `peer`, with a clear error when out of range."""
    if isinstance(peer, bool) or not isinstance(peer, int) or not 1 <= peer <= peers:
        raise ConfigError(f"peer must be an integer in 1..{peers} (peers are numbered from 1), got {peer!r}")
    return peer - 1


class Branched(nn.Module):
    """One trunk, tails with independent weights, optional peer-ensemble head.

    Each view goes through the trunk on its own, as in the released DKEL code, so every
    BatchNorm statistic is taken over one view of the batch (on CPU this is also faster
    than one pass over all views).  tail_views[i] is the view tail i reads (default i);
    trunk_grad_scale multiplies the gradient entering the trunk (CL's backprop rescaling)."""

    def __init__(self, backbone: Backbone, num_classes: int, peers: int, ensemble_head: bool,
                 tail_views: Optional[list[int]] = None, trunk_grad_scale: float = 1.0):
        super().__init__()
        self.trunk = backbone.trunk
        self.tails = nn.ModuleList(backbone.make_tail() for _ in range(peers))
        self.assemble = backbone.assemble
        self.feature_dim = backbone.feature_dim
        self.trunk_channels = backbone.trunk_channels
        self.head = nn.Linear(peers * backbone.feature_dim, num_classes) if ensemble_head else None
        self.tail_views = list(range(peers)) if tail_views is None else list(tail_views)
        if len(self.tail_views) != peers or min(self.tail_views) < 0:
            raise ValueError(f"tail_views {self.tail_views} must name one view for each of {peers} tails")
        self.views = max(self.tail_views) + 1
        self.trunk_grad_scale = trunk_grad_scale
        self._norms: Optional[PerViewNorms] = None  # packed: the trunk's per-view BatchNorms

    @property
    def peers(self) -> int:
        return len(self.tails)

    @property
    def packed(self) -> bool:
        return self._norms is not None

    def check_packable(self) -> None:
        check_packable(self.trunk)
        for tail in self.tails:
            check_packable(tail)

    def pack(self) -> None:
        """Run the views through the trunk as one batch and the tails as one grouped network."""
        if not self.packed:
            self.check_packable()
            self._norms = PerViewNorms(self.trunk)
            self.tails = PackedPeers(list(self.tails))

    def forward(self, x: Tensor) -> PeerOutputs:
        shared = shared_view(x, self.views)
        index = [0] * self.peers if shared else self.tail_views
        if self.packed:
            return self._packed_forward(x.unsqueeze(0) if shared else x, index)
        trunk = [scale_grad(self.trunk(v), self.trunk_grad_scale) for v in views_of(x, self.views)]
        outs = [tail(trunk[v]) for tail, v in zip(self.tails, index)]
        features = [o[1] for o in outs]
        ensemble = self.head(torch.cat(features, dim=1)) if self.head is not None else None
        return PeerOutputs(torch.stack([o[0] for o in outs]), torch.stack(features), ensemble, trunk)

    def _packed_forward(self, views: Tensor, index: list[int]) -> PeerOutputs:
        """views [V, B, C, H, W] through the trunk as one batch of V*B, then the grouped tails."""
        self._norms.start(views.shape[0])
        out = scale_grad(self.trunk(views.view(-1, *views.shape[2:])), self.trunk_grad_scale)
        self._norms.finish()
        trunk = out.view(views.shape[0], -1, *out.shape[1:])
        logits, features = self.tails(grouped(trunk, index))
        ensemble = self.head(features.transpose(0, 1).view(features.shape[1], -1)) if self.head is not None else None
        return PeerOutputs(logits, features, ensemble, trunk)

    def without_head(self) -> "Branched":
        """A deep copy with the same trunk and tails but no ensemble head (an EMA teacher)."""
        clone = copy.deepcopy(self)
        clone.head = None
        return clone

    def deploy(self, peer: int = 1) -> nn.Module:
        """A plain network whose outputs equal peer `peer`'s (1-based, like every peer number a user sees)."""
        i = peer_index(peer, self.peers)
        tail = self.tails[i] if self.packed else copy.deepcopy(self.tails[i])  # packed: an unpacked copy
        return self.assemble(plain_norms(copy.deepcopy(self.trunk)), tail)


class Cohort(nn.Module):
    """K fully independent networks, one per backbone (they may differ in architecture)."""

    def __init__(self, backbones: Sequence[Backbone]):
        super().__init__()
        self.nets = nn.ModuleList(SingleNet(b.trunk, b.make_tail()) for b in backbones)
        self.assemble = [b.assemble for b in backbones]

    @property
    def peers(self) -> int:
        return len(self.nets)

    @property
    def packed(self) -> bool:
        return isinstance(self.nets, PackedPeers)

    def check_packable(self) -> None:
        layouts = {tuple((k, tuple(v.shape)) for k, v in net.state_dict().items()) for net in self.nets}
        if len(layouts) > 1:
            raise NotPackable("the cohort's peers are different networks")
        for net in self.nets:
            check_packable(net)

    def pack(self) -> None:
        """Run the K networks as one grouped network."""
        if not self.packed:
            self.check_packable()
            self.nets = PackedPeers(list(self.nets))

    def forward(self, x: Tensor) -> PeerOutputs:
        shared = shared_view(x, self.peers)
        index = [0] * self.peers if shared else list(range(self.peers))
        if self.packed:
            net = self.nets.net
            logits, features = net.tail(net.trunk(grouped(x.unsqueeze(0) if shared else x, index)))
            return PeerOutputs(logits, features, None, None)
        views = views_of(x, self.peers)
        outs = [net.tail(net.trunk(views[i])) for i, net in zip(index, self.nets)]
        logits = torch.stack([o[0] for o in outs])
        widths = {o[1].shape[1] for o in outs}
        features = torch.stack([o[1] for o in outs]) if len(widths) == 1 else None
        return PeerOutputs(logits, features, None, None)

    def deploy(self, peer: int = 1) -> nn.Module:
        """Peer `peer` (1-based) as a plain network."""
        i = peer_index(peer, self.peers)
        net = self.nets[i] if self.packed else copy.deepcopy(self.nets[i])  # packed: an unpacked copy
        return self.assemble[i](net.trunk, net.tail)
