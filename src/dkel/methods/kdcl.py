"""KDCL, knowledge distillation via collaborative learning (Guo et al., CVPR 2020), SPEC section 4.

A cohort of K independent networks, each on its own view.  A teacher z_t is built from
all peers' logits and detached; every peer learns CE(z_i, y) + KD_tau(z_i, z_t).
ensemble=minlogit (default): z_t = min_i (z_i - z_{i,y}) elementwise; ensemble=naive:
the mean of the logits (SPEC); ensemble=lowest_ce: for each image the peer with the lowest
cross-entropy (what KDCL calls naive).  At test time (no labels) the reported "ensemble"
is the mean."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..losses import ENSEMBLES, kdcl_loss
from .base import StepOutput
from .common import Baseline, DistillConfig


@dataclass
class KDCLConfig(DistillConfig):
    ensemble: str = "minlogit"  # minlogit | naive (mean of logits) | lowest_ce (KDCL's own naive)


class KDCL(Baseline):
    name = "kdcl"
    summary = "cohort of K networks on their own views, distilling from a MinLogit ensemble teacher"
    paper = "Guo et al., CVPR 2020"
    Config = KDCLConfig
    authors_switches = ("ensemble=lowest_ce: KDCL's naive ensemble, the peer with the lowest cross-entropy "
                        "on each image",)

    def __init__(self, cfg, setup):
        super().__init__(cfg, setup)
        self.student = self.cohort()

    @classmethod
    def problems(cls, hp, cfg):
        return super().problems(hp, cfg) + [
            (hp.ensemble in ENSEMBLES, f"ensemble must be one of {', '.join(ENSEMBLES)}, got {hp.ensemble!r}")]

    def losses(self, views: Tensor, labels: Tensor, progress: float) -> StepOutput:
        logits = self.run("student", views).logits
        terms = kdcl_loss(logits, labels, ensemble=self.hp.ensemble, temperature=self.hp.temperature)
        return StepOutput(terms, logits[0])

    def eval_logits(self, x: Tensor) -> dict[str, Tensor]:
        return self.peer_outputs(self.student(x).logits)
