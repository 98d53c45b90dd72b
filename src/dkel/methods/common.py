"""What the SPEC section 4 baselines (DML, CL, ONE, OKDDip, KDCL) share.

`Baseline`: typed hyperparameters read from the flat run config, their checks, the
ramp-up r(e) scaled to the run's length, the `views` switch of the branched methods,
peer reporting and deployment of peer 1."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from torch import Tensor, nn

from ..losses import sigmoid_rampup
from ..models import Branched
from .base import Method, named_peers, peer_names


@dataclass
class DistillConfig:
    temperature: float = 3.0  # tau of KD_tau


@dataclass
class RampedConfig(DistillConfig):
    # r(e) = rampup_max * exp(-5 (1 - e / rampup_length)^2); epochs at the paper's full length
    rampup_length: float = 80.0
    rampup_max: float = 1.0


VIEWS = ("per_peer", "shared")


@dataclass
class BranchedConfig(RampedConfig):
    # per_peer: tail i trains on view i (SPEC); shared: every tail on one view (the authors' code)
    views: str = "per_peer"


class Baseline(Method):
    """Shared plumbing; subclasses set Config and implement `losses` and `eval_logits`."""

    Config: ClassVar[type] = DistillConfig
    min_peers = 2
    deploy_metric = "peer_mean"

    def __init__(self, cfg: Any, setup):
        super().__init__(cfg, setup)
        ramped = isinstance(self.hp, RampedConfig)
        self.rampup_length: Optional[float] = setup.time.epochs(self.hp.rampup_length) if ramped else None

    @classmethod
    def problems(cls, hp: Any, cfg: Any) -> list[tuple[bool, str]]:
        out = [(hp.temperature > 0, f"temperature must be > 0, got {hp.temperature}")]
        if isinstance(hp, RampedConfig):
            out += [(hp.rampup_length > 0, f"rampup_length must be > 0, got {hp.rampup_length}"),
                    (hp.rampup_max >= 0, f"rampup_max must be >= 0, got {hp.rampup_max}")]
        if isinstance(hp, BranchedConfig):
            out.append((hp.views in VIEWS, f"views must be one of {', '.join(VIEWS)}, got {hp.views!r}"))
        return out

    @classmethod
    def view_count(cls, cfg: Any) -> int:
        return 1 if getattr(cls.settings(cfg), "views", None) == "shared" else cfg.peers

    def inputs(self, views: Tensor) -> Tensor:
        """What the model is called with: the K views, or the one shared view ([B, C, H, W])."""
        return views[0] if self.view_count(self.cfg) == 1 else views

    def branched(self, tails: int, **options) -> Branched:
        """One trunk and `tails` tails of the run's model, no ensemble head (options: see Branched)."""
        return self.setup.branched(tails, False, **options)

    def cohort(self) -> nn.Module:
        """K independent networks of the run's model."""
        return self.setup.cohort()

    def kd_weight(self, progress: float) -> float:
        """r(e) after `progress` epochs, with the ramp length scaled to this run (setup.time)."""
        return sigmoid_rampup(self.setup.time.at(progress), self.rampup_length, self.hp.rampup_max)

    def time_constants(self) -> dict[str, Any]:
        if self.rampup_length is None:
            return {}
        return {**self.setup.time.describe(), "rampup_epochs": self.rampup_length}

    def peer_outputs(self, logits: Tensor) -> dict[str, Tensor]:
        """peer1..peerK and their logit mean, "ensemble"."""
        return {**named_peers("peer", logits), "ensemble": logits.mean(0)}

    def peer_groups(self) -> dict[str, list[str]]:
        return {"peer": peer_names("peer", self.setup.peers)}

    def deploy(self) -> nn.Module:
        """Peer 1 as a plain network (the reported number is the mean over peers, SPEC section 6)."""
        return self.student.deploy(1)
