"""The interface every method implements.

A method is an nn.Module that owns everything it trains and everything it keeps
besides (EMA teachers, counters), so its state_dict is its whole state.  The engine
only ever calls the methods below; a method's math lives in its own file."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..config import NoConfig, TimeScale
from ..errors import ConfigError


@dataclass(frozen=True)
class Setup:
    """What a method is built from besides its own hyperparameters."""

    model: str
    num_classes: int
    in_channels: int
    peers: int
    epochs: int
    steps_per_epoch: int
    time: TimeScale


class StepOutput(NamedTuple):
    losses: dict[str, Any]  # "loss" is the total to minimise; other entries are logged
    logits: Tensor  # [B, C] logits whose training accuracy the progress bar shows
    monitors: dict[str, Tensor] = {}  # per-step values the engine averages over the epoch (never mutated)


class Method(nn.Module):
    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `dkel list`
    paper: ClassVar[str]  # where the method comes from
    Config: ClassVar[type] = NoConfig
    min_peers: ClassVar[int] = 1
    shared_view: ClassVar[bool] = False  # True: every peer trains on the same view of an image
    # the reported output whose accuracy is `deploy_acc` (SPEC section 6 reporting rule)
    deploy_metric: ClassVar[str] = "peer_mean"

    def __init__(self, cfg: Any, setup: Setup):
        super().__init__()
        self.cfg, self.setup = cfg, setup
        self.hp = self.settings(cfg)
        self.student: nn.Module  # the trained part: the only module in the optimizer and in DDP
        self._runners: dict[str, Callable] = {}

    # -- building ------------------------------------------------------------------------
    @classmethod
    def settings(cls, cfg: Any) -> Any:
        """This method's own hyperparameters, as its typed Config, from the flat run config."""
        return cls.Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls.Config)})

    @classmethod
    def problems(cls, hp: Any, cfg: Any) -> list[tuple[bool, str]]:
        """(condition, message) pairs; the first false condition is reported."""
        return []

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Reject impossible hyperparameters with a ConfigError naming the first problem."""
        for ok, msg in cls.problems(cls.settings(cfg), cfg):
            if not ok:
                raise ConfigError(msg)

    def run(self, name: str, x: Tensor):
        """Call submodule `name` through its wrapper (DDP) if the engine set one."""
        return self._runners.get(name, getattr(self, name))(x)

    def wrap(self, name: str, wrapper: Callable[[Callable], Callable]) -> None:
        """Wrap how submodule `name` is called; wrappers compose."""
        self._runners[name] = wrapper(self._runners.get(name, getattr(self, name)))

    @property
    def mode(self) -> Optional[str]:
        return getattr(self.cfg, "mode", None)

    def run_tag(self) -> str:
        """Default run-folder name."""
        return self.mode or "default"

    def time_constants(self) -> dict[str, float]:
        """The effective (scaled) time constants, for the log and results.json."""
        return {}

    # -- training ------------------------------------------------------------------------
    def prepare(self, batches: Iterator[tuple[Tensor, Tensor]]) -> None:
        """One-off work before the first epoch (e.g. teacher initialisation)."""

    def losses(self, views: Tensor, labels: Tensor, epoch: int) -> StepOutput:
        """Named losses for a batch; views are [K, B, C, H, W] (or [1, B, ...] if shared_view)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Update state that is not trained by the optimizer (EMA), after optimizer step `step`."""

    def epoch_diagnostics(self) -> dict[str, float]:
        """Values read once at the end of each training epoch (per-step ones go in StepOutput.monitors)."""
        return {}

    # -- evaluation and deployment -------------------------------------------------------
    def eval_logits(self, x: Tensor) -> dict[str, Tensor]:
        """Logits of every reported output for a batch of test images (modules in eval mode)."""
        raise NotImplementedError

    def peer_groups(self) -> dict[str, list[str]]:
        """Groups of outputs reported also as their mean (`<group>_mean`) and max (`<group>_max`)."""
        return {}

    def deploy(self) -> nn.Module:
        """The single network a user takes away."""
        raise NotImplementedError


def peer_names(prefix: str, k: int) -> list[str]:
    return [f"{prefix}{i + 1}" for i in range(k)]


def named_peers(prefix: str, logits: Tensor) -> dict[str, Tensor]:
    return dict(zip(peer_names(prefix, logits.shape[0]), logits.unbind(0)))


@torch.no_grad()
def ema_update(teacher: list[Tensor], student: list[Tensor], alpha: float) -> None:
    """teacher <- alpha * teacher + (1 - alpha) * student, as one fused multi-tensor op."""
    torch._foreach_lerp_(teacher, student, 1.0 - alpha)
