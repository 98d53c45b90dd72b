"""DML, deep mutual learning (Zhang et al., CVPR 2018), SPEC section 4.

A cohort of K independent networks, all trained on the same view of each image:
L_k = CE(z_k, y) + (1/(K-1)) sum_{l != k} KD_tau(z_k, z_l), the peers' logits detached,
all networks updated together by one optimizer.  The default is SPEC's tau = 3 with the
tau^2 factor; the DML paper's own loss is temperature=1 tau_squared=false (its alternating
updates, one network after the other, are not offered: dkel updates the cohort jointly)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..losses import dml_loss
from .base import StepOutput
from .common import Baseline, DistillConfig


@dataclass
class DMLConfig(DistillConfig):
    tau_squared: bool = True  # multiply KD by tau^2 (false + temperature=1: the DML paper)


class DML(Baseline):
    name = "dml"
    summary = "cohort of K networks on one shared view, each distilling from every other peer"
    paper = "Zhang et al., CVPR 2018"
    Config = DMLConfig
    authors_switches = ("temperature=1 tau_squared=false: the DML paper's plain KL at tau = 1 (its "
                        "alternating updates are not offered; the cohort is updated jointly)",)

    @classmethod
    def view_count(cls, cfg) -> int:
        return 1

    def __init__(self, cfg, setup):
        super().__init__(cfg, setup)
        self.student = self.cohort()

    def losses(self, views: Tensor, labels: Tensor, progress: float) -> StepOutput:
        logits = self.run("student", self.inputs(views)).logits
        terms = dml_loss(logits, labels, temperature=self.hp.temperature, tau_squared=self.hp.tau_squared)
        return StepOutput(terms, logits[0])

    def eval_logits(self, x: Tensor) -> dict[str, Tensor]:
        return self.peer_outputs(self.student(x).logits)
