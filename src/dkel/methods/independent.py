"""Independent training: K separate networks, each on its own view, cross-entropy only.

The reference point every online-distillation method has to beat (SPEC section 4)."""
from __future__ import annotations

from torch import Tensor, nn

from ..losses import cross_entropy
from .base import Method, StepOutput, named_peers, peer_names


class Independent(Method):
    name = "independent"
    summary = "K independent networks, cross-entropy only (the baseline)"
    paper = "baseline (no distillation)"

    def __init__(self, cfg, setup):
        super().__init__(cfg, setup)
        self.student = setup.cohort()

    def losses(self, views: Tensor, labels: Tensor, progress: float) -> StepOutput:
        logits = self.run("student", views).logits
        return StepOutput({"loss": cross_entropy(logits, labels)}, logits[0])

    def eval_logits(self, x: Tensor) -> dict[str, Tensor]:
        return named_peers("peer", self.student(x).logits)

    def peer_groups(self) -> dict[str, list[str]]:
        return {"peer": peer_names("peer", self.setup.peers)}

    def deploy(self) -> nn.Module:
        return self.student.deploy(1)
