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

from .. import models
from ..config import NoConfig, TimeScale
from ..errors import ConfigError


@dataclass(frozen=True)
class Setup:
    """What a method is built from besides its own hyperparameters."""

    model: Any  # a model specification (models/__init__.py), or a list of them, one per peer
    num_classes: int
    in_channels: int
    peers: int
    epochs: int
    steps_per_epoch: int
    time: TimeScale
    split: Optional[str] = None  # first tail module of a foreign network (None: where its last stage starts)
    image_size: Optional[int] = None  # the data's, for networks built for one input size

    def branched(self, tails: int, ensemble_head: bool, **options) -> models.Branched:
        """One trunk and `tails` tails of the run's model (options: see Branched)."""
        return models.create_branched(self.model, self.num_classes, tails, ensemble_head, self.in_channels,
                                      split=self.split, image_size=self.image_size, **options)

    def cohort(self) -> models.Cohort:
        """`peers` whole networks of the run's model (or one per entry of a list)."""
        return models.create_cohort(self.model, self.num_classes, self.peers, self.in_channels,
                                    image_size=self.image_size)


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
    # settings that make a method behave as its authors' code does, for `dkel list` and docs
    authors_switches: ClassVar[tuple[str, ...]] = ()
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
    def view_count(cls, cfg: Any) -> int:
        """Augmented views the loader makes of each image: one per peer, or one shared by all."""
        return cfg.peers

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

    def time_constants(self) -> dict[str, Any]:
        """The effective (scaled) time constants, for the log and results.json."""
        return {}

    def warnings(self) -> list[str]:
        """What makes this configuration measure something else than intended; logged once at start."""
        return []

    # -- training ------------------------------------------------------------------------
    def prepare(self, batches: Iterator[tuple[Tensor, Tensor]]) -> None:
        """One-off work before the first epoch (e.g. teacher initialisation)."""

    def losses(self, views: Tensor, labels: Tensor, progress: float) -> StepOutput:
        """Named losses for a batch; views are [K, B, C, H, W] ([V, B, ...] with V = view_count).

        `progress` is the training time in epochs, epoch + fraction of it done; weights that
        follow a schedule are evaluated at `self.setup.time.at(progress)`."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Update state that is not trained by the optimizer (EMA), after optimizer step `step`."""

    def epoch_diagnostics(self, probe: tuple[Tensor, Tensor], progress: float) -> dict[str, float]:
        """Values measured once at the end of each training epoch (per-step ones go in
        StepOutput.monitors), e.g. on `probe`: a small batch of training views and labels, the
        same every epoch.  Must leave every state (weights, BatchNorm statistics) as it was."""
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
def ema_update(teacher: list[Tensor], student: list[Tensor], alpha: float | Tensor) -> None:
    """teacher <- alpha * teacher + (1 - alpha) * student, as one fused multi-tensor op (a lerp:
    teacher + (1 - alpha) (student - teacher), the same update to float rounding)."""
    weight = 1.0 - alpha
    if isinstance(weight, Tensor):  # compiled, a moving alpha is a tensor computed in the graph
        weight = weight.to(teacher[0].dtype)
    torch._foreach_lerp_(teacher, student, weight)
