"""Trunk/tail networks and the two multi-peer containers every method builds on.

A backbone is split into a *trunk* (stem and every stage but the last) and a *tail*
(last stage, global pooling, classifier).  A plain network is trunk + one tail; a
branched model shares one trunk between K tails; a cohort is K whole networks.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses import scale_grad


class Tail(nn.Module):
    """Last stage -> pooled feature -> classifier; returns (logits, feature)."""

    def __init__(self, stage: nn.Module, classifier: nn.Module):
        super().__init__()
        self.stage = stage
        self.classifier = classifier

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature = self.stage(x).mean(dim=(2, 3))
        return self.classifier(feature), feature


@dataclass
class Backbone:
    """What a model factory returns: a trunk and a way to make independent tails."""

    trunk: nn.Module
    make_tail: Callable[[], Tail]
    feature_dim: int  # width of a tail's pooled feature
    trunk_channels: int  # channels of the trunk's output


class SingleNet(nn.Module):
    """A plain network: trunk + one tail, returning logits."""

    def __init__(self, trunk: nn.Module, tail: Tail):
        super().__init__()
        self.trunk = trunk
        self.tail = tail

    def forward(self, x: Tensor) -> Tensor:
        return self.tail(self.trunk(x))[0]


class PeerOutputs(NamedTuple):
    logits: Tensor  # [K, B, C]
    features: Tensor  # [K, B, d] pooled tail features
    ensemble: Optional[Tensor]  # [B, C] from the peer-ensemble head, if any
    trunk: Optional[list[Tensor]]  # branched models: the trunk output of each view


def views_of(x: Tensor, views: int) -> list[Tensor]:
    """One view per peer ([V, B, C, H, W]) or one view shared by all ([B, C, H, W])."""
    if x.dim() == 4:
        return [x]
    if x.shape[0] != views:
        raise ValueError(f"got {x.shape[0]} views for a model that takes {views}")
    return list(x.unbind(0))


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
        self.feature_dim = backbone.feature_dim
        self.trunk_channels = backbone.trunk_channels
        self.head = nn.Linear(peers * backbone.feature_dim, num_classes) if ensemble_head else None
        self.tail_views = list(range(peers)) if tail_views is None else list(tail_views)
        if len(self.tail_views) != peers or min(self.tail_views) < 0:
            raise ValueError(f"tail_views {self.tail_views} must name one view for each of {peers} tails")
        self.views = max(self.tail_views) + 1
        self.trunk_grad_scale = trunk_grad_scale

    @property
    def peers(self) -> int:
        return len(self.tails)

    def forward(self, x: Tensor) -> PeerOutputs:
        views = views_of(x, self.views)
        trunk = [scale_grad(self.trunk(v), self.trunk_grad_scale) for v in views]
        outs = [tail(trunk[v if len(trunk) > 1 else 0]) for tail, v in zip(self.tails, self.tail_views)]
        features = [o[1] for o in outs]
        ensemble = self.head(torch.cat(features, dim=1)) if self.head is not None else None
        return PeerOutputs(torch.stack([o[0] for o in outs]), torch.stack(features), ensemble, trunk)

    def without_head(self) -> "Branched":
        """A deep copy with the same trunk and tails but no ensemble head (an EMA teacher)."""
        clone = copy.deepcopy(self)
        clone.head = None
        return clone

    def deploy(self, peer: int = 1) -> SingleNet:
        """A plain network whose outputs equal peer `peer`'s (1-based, like every peer number a user sees)."""
        return SingleNet(copy.deepcopy(self.trunk), copy.deepcopy(self.tails[peer_index(peer, self.peers)]))


class Cohort(nn.Module):
    """K fully independent networks."""

    def __init__(self, make_backbone: Callable[[], Backbone], peers: int):
        super().__init__()
        backbones = [make_backbone() for _ in range(peers)]
        self.nets = nn.ModuleList(SingleNet(b.trunk, b.make_tail()) for b in backbones)
        self.feature_dim = backbones[0].feature_dim
        self.trunk_channels = backbones[0].trunk_channels

    @property
    def peers(self) -> int:
        return len(self.nets)

    def forward(self, x: Tensor) -> PeerOutputs:
        views = views_of(x, self.peers)
        outs = [net.tail(net.trunk(views[i if len(views) > 1 else 0])) for i, net in enumerate(self.nets)]
        logits = torch.stack([o[0] for o in outs])
        features = torch.stack([o[1] for o in outs])
        return PeerOutputs(logits, features, None, None)

    def deploy(self, peer: int = 1) -> SingleNet:
        """Peer `peer` (1-based) as a plain network."""
        return copy.deepcopy(self.nets[peer_index(peer, self.peers)])
