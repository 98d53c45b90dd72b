"""ONE, on-the-fly native ensemble (Lan et al., NeurIPS 2018), SPEC section 4.

A branched model (one trunk, K tails, each on its own view; views=shared: all on one, as
in the authors' code) plus a gate on the trunk output: global average pool -> Linear(C_trunk -> K) -> BatchNorm1d(K) -> ReLU -> softmax
gives g [B, K] and the gated ensemble z_e = sum_i g_i z_i.  With K training views the
gate reads the pooled trunk output averaged over the views (at test time: the one view).
L = sum_i CE(z_i, y) + CE(z_e, y) + r(e) sum_i KD_tau(z_i, z_e), z_e detached.
Reported: each branch (peer1..K), their mean (deployed number) and the gated ensemble one_e."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..losses import gated_ensemble, one_loss
from ..models import Branched, PeerOutputs, pool_trunk
from .base import StepOutput, named_peers
from .common import Baseline, BranchedConfig


@dataclass
class ONEConfig(BranchedConfig):
    pass


def make_gate(trunk_channels: int, peers: int) -> nn.Sequential:
    """[B, C_trunk] pooled trunk features -> [B, K] branch weights (rows on the simplex)."""
    return nn.Sequential(nn.Linear(trunk_channels, peers), nn.BatchNorm1d(peers), nn.ReLU(inplace=True),
                         nn.Softmax(dim=1))


class OneStudent(nn.Module):
    """Branched model + gate; `ensemble` of its outputs is the gated ensemble z_e."""

    def __init__(self, net: Branched):
        super().__init__()
        self.net = net
        self.gate = make_gate(net.trunk_channels, net.peers)

    @staticmethod
    def pooled_trunk(out: PeerOutputs) -> Tensor:
        """[B, C_trunk]: the trunk output pooled (over space, or tokens) and averaged over the views."""
        return torch.stack([pool_trunk(h) for h in out.trunk]).mean(0)

    def forward(self, x: Tensor) -> PeerOutputs:
        out = self.net(x)
        gate = self.gate(self.pooled_trunk(out))
        return out._replace(ensemble=gated_ensemble(out.logits, gate))

    def deploy(self, peer: int = 1) -> nn.Module:
        return self.net.deploy(peer)


class ONE(Baseline):
    name = "one"
    summary = "K tails on one trunk with a softmax gate; every branch distils from the gated ensemble"
    paper = "Lan et al., NeurIPS 2018"
    Config = ONEConfig
    authors_switches = ("views=shared: one view for every branch and the gate, as in Lan et al.'s code",)

    def __init__(self, cfg, setup):
        super().__init__(cfg, setup)
        self.student = OneStudent(self.branched(setup.peers))

    def losses(self, views: Tensor, labels: Tensor, progress: float) -> StepOutput:
        out = self.run("student", self.inputs(views))
        r = self.kd_weight(progress)
        terms = one_loss(out.logits, out.ensemble, labels, kd_weight=r, temperature=self.hp.temperature)
        return StepOutput({**terms, "w_rampup": r}, out.logits[0])

    def eval_logits(self, x: Tensor) -> dict[str, Tensor]:
        out = self.student(x)
        return {**named_peers("peer", out.logits), "one_e": out.ensemble}
