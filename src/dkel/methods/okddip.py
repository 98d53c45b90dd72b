"""OKDDip, online knowledge distillation with diverse peers (Chen et al., AAAI 2020), SPEC section 4.

A branched model whose tails are K auxiliary peers plus one group leader.  Convention:
`peers` = K counts the auxiliary peers only and the leader is an extra tail (K + 1 tails;
peers=3 is the official 3 peers + leader).  The loader gives K views, so the leader reads
the trunk output of view 1; views=shared feeds every tail the same view, as the official
code does.
leader_in_peers=true instead makes the leader the K-th of `peers` tails (K - 1 auxiliary
peers, each tail on its own view), the official code's `num_branches` convention.

Auxiliary peer a (pooled feature u_a) gets q_a = W_q u_a, k_a = W_k u_a (Linear d -> d/8,
no bias, shared by the peers), alpha_ab = softmax_b(q_a . k_b) and the target
t_a = sum_b alpha_ab z_b, which is NOT detached (it trains W_q, W_k).  The leader learns
from the mean of the auxiliary peers, detached:
L = sum_a CE(z_a, y) + CE(z_L, y) + r(e) [ sum_a KD_tau(z_a, t_a) + KD_tau(z_L, mean_a z_a) ].
detach_leader_target=false lets that distillation train the peers too (the official
train_GL.py).  The leader is reported as the deployed number and deployed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor, nn

from ..errors import ConfigError
from ..losses import attention_targets, attention_weights, okddip_loss
from ..models import Branched, PeerOutputs
from .base import StepOutput, peer_names
from .common import Baseline, BranchedConfig


@dataclass
class OKDDipConfig(BranchedConfig):
    attention_factor: int = 8  # W_q, W_k project the d-dim pooled feature to d // attention_factor
    leader_in_peers: bool = False  # false: peers auxiliary peers + 1 extra leader tail
    detach_leader_target: bool = True  # false: the leader's KD also trains the peers (official train_GL.py)


class OkddipOutputs(NamedTuple):
    peers: PeerOutputs  # the auxiliary peers' logits [K, B, C] and features [K, B, d]
    leader: Tensor  # [B, C]
    targets: Tensor  # attention targets t_a [K, B, C], with their gradient
    alpha: Tensor  # attention weights [B, K, K]


class OkddipStudent(nn.Module):
    """Branched model whose last tail is the leader, plus the shared query/key projections."""

    def __init__(self, net: Branched, attention_factor: int = 8):
        super().__init__()
        self.net = net
        dim = net.feature_dim // attention_factor
        if dim < 1:
            raise ConfigError(f"attention_factor {attention_factor} leaves no dimensions of the "
                              f"{net.feature_dim}-dim feature")
        self.query = nn.Linear(net.feature_dim, dim, bias=False)
        self.key = nn.Linear(net.feature_dim, dim, bias=False)

    def forward(self, x: Tensor) -> OkddipOutputs:
        out = self.net(x)
        logits, features = out.logits[:-1], out.features[:-1]
        alpha = attention_weights(self.query(features), self.key(features))
        peers = out._replace(logits=logits, features=features)
        return OkddipOutputs(peers, out.logits[-1], attention_targets(logits, alpha), alpha)

    def deploy(self, tail: int) -> nn.Module:
        """Tail `tail` (1-based; the last one is the leader) as a plain network."""
        return self.net.deploy(tail)


class OKDDip(Baseline):
    name = "okddip"
    summary = "K attention-taught auxiliary peers + 1 extra leader tail taught by their mean (deployed)"
    paper = "Chen et al., AAAI 2020"
    Config = OKDDipConfig
    deploy_metric = "leader"
    authors_switches = ("views=shared: one view for every peer and the leader, as in the official code",
                        "detach_leader_target=false: the leader's target keeps its gradient (official train_GL.py)")

    def __init__(self, cfg, setup):
        super().__init__(cfg, setup)
        k = setup.peers
        # an extra leader tail reads view 1 (the loader makes K views); otherwise tail K is the leader
        tail_views = list(range(k)) if self.hp.leader_in_peers else list(range(k)) + [0]
        self.student = OkddipStudent(self.branched(len(tail_views), tail_views=tail_views), self.hp.attention_factor)

    @property
    def auxiliary(self) -> int:
        return self.setup.peers - 1 if self.hp.leader_in_peers else self.setup.peers

    @classmethod
    def problems(cls, hp, cfg):
        aux = cfg.peers - 1 if hp.leader_in_peers else cfg.peers
        return super().problems(hp, cfg) + [
            (hp.attention_factor >= 1, f"attention_factor must be >= 1, got {hp.attention_factor}"),
            (aux >= 2, f"OKDDip needs at least 2 auxiliary peers, got {aux} (peers={cfg.peers}, "
                       f"leader_in_peers={hp.leader_in_peers})")]

    def losses(self, views: Tensor, labels: Tensor, progress: float) -> StepOutput:
        out = self.run("student", self.inputs(views))
        r = self.kd_weight(progress)
        terms = okddip_loss(out.peers.logits, out.leader, out.targets, labels, kd_weight=r,
                            temperature=self.hp.temperature, detach_leader_target=self.hp.detach_leader_target)
        self_attention = out.alpha.detach().diagonal(dim1=1, dim2=2).mean()
        return StepOutput({**terms, "w_rampup": r, "attention_self": self_attention}, out.leader)

    def eval_logits(self, x: Tensor) -> dict[str, Tensor]:
        out = self.student(x)
        return {**self.peer_outputs(out.peers.logits), "leader": out.leader}

    def peer_groups(self) -> dict[str, list[str]]:
        return {"peer": peer_names("peer", self.auxiliary)}

    def deploy(self) -> nn.Module:
        return self.student.deploy(self.student.net.peers)
