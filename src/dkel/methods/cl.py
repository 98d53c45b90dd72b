"""CL, collaborative learning with intermediate-level representation sharing (Song & Chai,
NeurIPS 2018), SPEC section 4.

A branched model (one trunk, K tails, each tail on its own view).  Backprop rescaling: the
gradient entering the trunk from the tails is divided by K (identity forward).  Head h
learns CE(z_h, y) + r(e) KD_tau(z_h, mean_{j != h} z_j) with the soft target detached."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..losses import cl_loss
from .base import StepOutput
from .common import Baseline, RampedConfig


@dataclass
class CLConfig(RampedConfig):
    backprop_rescaling: bool = True  # divide the trunk's incoming gradient by K


class CL(Baseline):
    name = "cl"
    summary = "K tails on one trunk (trunk gradient / K), each distilling from the mean of the others"
    paper = "Song & Chai, NeurIPS 2018"
    Config = CLConfig

    def __init__(self, cfg, setup):
        super().__init__(cfg, setup)
        scale = 1.0 / setup.peers if self.hp.backprop_rescaling else 1.0
        self.student = self.branched(setup.peers, trunk_grad_scale=scale)

    def losses(self, views: Tensor, labels: Tensor, epoch: int) -> StepOutput:
        logits = self.run("student", views).logits
        r = self.kd_weight(epoch)
        terms = cl_loss(logits, labels, kd_weight=r, temperature=self.hp.temperature)
        return StepOutput({**terms, "w_rampup": r}, logits[0])

    def eval_logits(self, x: Tensor) -> dict[str, Tensor]:
        return self.peer_outputs(self.student(x).logits)
