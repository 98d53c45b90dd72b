"""CL, collaborative learning with intermediate-level representation sharing (Song & Chai,
NeurIPS 2018), SPEC section 4.

A branched model (one trunk, K tails, each tail on its own view; views=shared: all on one).
Backprop rescaling: the gradient entering the trunk from the tails is divided by K
(identity forward).  Head h learns CE(z_h, y) + r(e) KD_tau(z_h, mean_{j != h} z_j) with
the soft target detached (SPEC); loss=song_chai: beta CE + (1 - beta) KD_tau without
ramp-up, beta = hard_weight = 0.5 and tau = 2 unless set (Song & Chai's setting)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from ..losses import cl_loss, cl_song_chai_loss
from .base import StepOutput
from .common import Baseline, BranchedConfig, DistillConfig

LOSSES = ("spec", "song_chai")
SONG_CHAI_TEMPERATURE = 2.0


@dataclass
class CLConfig(BranchedConfig):
    temperature: Optional[float] = None  # default 3 (SPEC), 2 with loss=song_chai
    backprop_rescaling: bool = True  # divide the trunk's incoming gradient by K
    loss: str = "spec"  # spec | song_chai
    hard_weight: float = 0.5  # song_chai's beta, the weight of the cross-entropy


class CL(Baseline):
    name = "cl"
    summary = "K tails on one trunk (trunk gradient / K), each distilling from the mean of the others"
    paper = "Song & Chai, NeurIPS 2018"
    Config = CLConfig
    authors_switches = ("views=shared: one view for every head, as in Song & Chai",
                        "loss=song_chai: beta CE + (1 - beta) tau^2 KL, beta = hard_weight = 0.5, tau = 2, no ramp-up")

    def __init__(self, cfg, setup):
        super().__init__(cfg, setup)
        scale = 1.0 / setup.peers if self.hp.backprop_rescaling else 1.0
        self.student = self.branched(setup.peers, trunk_grad_scale=scale)

    @classmethod
    def settings(cls, cfg) -> CLConfig:
        hp = super().settings(cfg)
        if hp.temperature is None:
            hp.temperature = SONG_CHAI_TEMPERATURE if hp.loss == "song_chai" else DistillConfig.temperature
        return hp

    @classmethod
    def problems(cls, hp, cfg):
        return super().problems(hp, cfg) + [
            (hp.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {hp.loss!r}"),
            (0 <= hp.hard_weight <= 1, f"hard_weight must be in [0, 1], got {hp.hard_weight}")]

    def time_constants(self):
        return super().time_constants() if self.hp.loss == "spec" else {}

    def losses(self, views: Tensor, labels: Tensor, progress: float) -> StepOutput:
        logits = self.run("student", self.inputs(views)).logits
        if self.hp.loss == "song_chai":
            terms = cl_song_chai_loss(logits, labels, hard_weight=self.hp.hard_weight, temperature=self.hp.temperature)
            return StepOutput(terms, logits[0])
        r = self.kd_weight(progress)
        terms = cl_loss(logits, labels, kd_weight=r, temperature=self.hp.temperature)
        return StepOutput({**terms, "w_rampup": r}, logits[0])

    def eval_logits(self, x: Tensor) -> dict[str, Tensor]:
        return self.peer_outputs(self.student(x).logits)
