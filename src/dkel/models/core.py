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
    trunk: Optional[Tensor]  # trunk output (branched models only), [K*B, ...] or [B, ...]


def split_views(x: Tensor, peers: int) -> tuple[Tensor, bool]:
    """Accept one view per peer ([K, B, C, H, W]) or one view shared by all ([B, C, H, W])."""
    if x.dim() == 5:
        if x.shape[0] != peers:
            raise ValueError(f"got {x.shape[0]} views for {peers} peers")
        return x, False
    return x, True


class Branched(nn.Module):
    """One trunk, K tails with independent weights, optional peer-ensemble head.

    Per-peer views go through the trunk as one batch of K*B images, so BatchNorm
    statistics in the trunk are taken over all views of the batch."""

    def __init__(self, backbone: Backbone, num_classes: int, peers: int, ensemble_head: bool):
        super().__init__()
        self.trunk = backbone.trunk
        self.tails = nn.ModuleList(backbone.make_tail() for _ in range(peers))
        self.feature_dim = backbone.feature_dim
        self.trunk_channels = backbone.trunk_channels
        self.head = nn.Linear(peers * backbone.feature_dim, num_classes) if ensemble_head else None

    @property
    def peers(self) -> int:
        return len(self.tails)

    def forward(self, x: Tensor) -> PeerOutputs:
        x, shared = split_views(x, self.peers)
        if shared:
            trunk = self.trunk(x)
            per_peer = [trunk] * self.peers
        else:
            trunk = self.trunk(x.flatten(0, 1))
            per_peer = trunk.chunk(self.peers)
        outs = [tail(h) for tail, h in zip(self.tails, per_peer)]
        logits = torch.stack([o[0] for o in outs])
        features = torch.stack([o[1] for o in outs])
        ensemble = None
        if self.head is not None:
            ensemble = self.head(torch.cat([o[1] for o in outs], dim=1))
        return PeerOutputs(logits, features, ensemble, trunk)

    def without_head(self) -> "Branched":
        """A deep copy with the same trunk and tails but no ensemble head (an EMA teacher)."""
        clone = copy.deepcopy(self)
        clone.head = None
        return clone

    def deploy(self, peer: int = 0) -> SingleNet:
        """A plain network whose outputs equal peer `peer`'s."""
        return SingleNet(copy.deepcopy(self.trunk), copy.deepcopy(self.tails[peer]))


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
        x, shared = split_views(x, self.peers)
        views = [x] * self.peers if shared else x.unbind(0)
        outs = [net.tail(net.trunk(v)) for net, v in zip(self.nets, views)]
        logits = torch.stack([o[0] for o in outs])
        features = torch.stack([o[1] for o in outs])
        return PeerOutputs(logits, features, None, None)

    def deploy(self, peer: int = 0) -> SingleNet:
        return copy.deepcopy(self.nets[peer])
