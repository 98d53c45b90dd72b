"""Run configuration: typed dataclasses, YAML files and `key=value` overrides.

One flat namespace: the engine's fields (`TrainConfig`) plus the chosen method's
hyperparameters (its own `Config` dataclass, defined next to the method).  Values
are resolved in order: dataclass defaults < YAML file < command-line flags < overrides."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

SCHEDULES = ("cosine", "multistep")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PROGRESS = ("auto", "bar", "lines", "none")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PACKED = ("auto", True, False)


@dataclass
class TrainConfig:
    # what to train
    method: str = "dkel"
    model: str = "resnet8"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None  # resize image files to this square size
    train_subset: Optional[int] = None  # class-balanced subset of the training split
    cache_dir: Optional[str] = None  # decoded-dataset cache (default ~/.cache/dkel)
    peers: int = 3
    # recipe (SPEC section 6)
    epochs: int = 30
    batch_size: int = 128  # global batch, split across processes
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | multistep
    milestones: list[int] = field(default_factory=lambda: [150, 225])  # multistep, in epochs
    gamma: float = 0.1
    # "auto" scales ramp-up, decay and EMA horizons to this run's length relative to the
    # paper's schedule for the dataset (1 at full length); a number scales them by it
    time_scale: Union[str, float] = "auto"
    seed: int = 0
    # execution
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    channels_last: Optional[bool] = None  # default: on
    # K peers (and a teacher, a cohort) as one grouped network: auto | true | false; auto packs
    # where that is faster (CUDA; docs/performance.md) and every module type is packable
    packed: Union[str, bool] = "auto"
    compile: bool = False  # torch.compile the whole training step
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead" adds CUDA graphs
    threads: Optional[int] = None  # CPU threads (default: torch's choice)
    eval_batch_size: int = 1000
    sync_bn: bool = False  # SyncBatchNorm in the trained modules under DDP
    collapse_check: bool = True
    # output
    out: Optional[str] = None  # exact run folder; default runs/<dataset>/<method>-<model>/<name>-seed<k>
    runs_dir: str = "runs"
    name: Optional[str] = None  # default: the method's mode, else "default"
    tensorboard: bool = False
    progress: str = "auto"  # auto | bar | lines | none


@dataclass
class NoConfig:
    """Methods without hyperparameters of their own."""


@functools.cache
def run_config_class(method_config: type) -> type:
    """One dataclass with the engine's fields and the method's, so overrides stay flat."""
    fields = []
    for cls in (TrainConfig, method_config):
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if any(f.name == g[0] for g in fields):
                raise TypeError(f"{method_config.__name__}.{f.name} collides with a field of TrainConfig")
            fields.append((f.name, hints[f.name],
                           field(default=f.default, default_factory=f.default_factory)))
    return dataclasses.make_dataclass(f"RunConfig_{method_config.__name__}", fields)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must be a mapping of key: value")
    return data


def check_keys(values: dict[str, Any], cls: type, source: str) -> None:
    valid = field_names(cls)
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")


def resolve(layers: list[tuple[str, dict[str, Any]]], method_configs: dict[str, type]) -> Any:
    """Merge (source, values) layers into a typed run config for the method they name."""
    method = TrainConfig.method
    for _, values in layers:
        method = values.get("method", method) or method
    if method not in method_configs:
        from .registry import unknown_name_message

        raise ConfigError(unknown_name_message("method", str(method), list(method_configs)))
    cls = run_config_class(method_configs[method])
    cfg = OmegaConf.structured(cls)
    for source, values in layers:
        check_keys(values, cls, source)
        try:
            cfg = OmegaConf.merge(cfg, values)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            msg = str(e).splitlines()[0]
            raise ConfigError(f"config key {key!r} in {source}: {msg}") from None
    return validate(OmegaConf.to_object(cfg))


def validate(cfg: Any) -> Any:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}")
    need(cfg.peers >= 1, f"peers must be >= 1, got {cfg.peers}")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {cfg.eval_batch_size}")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"lr must be a positive number, got {cfg.lr}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(0 <= cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum}")
    need(cfg.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    need(cfg.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    need(cfg.progress in PROGRESS, f"progress must be one of {', '.join(PROGRESS)}, got {cfg.progress!r}")
    need(cfg.train_subset is None or cfg.train_subset >= 1, f"train_subset must be >= 1, got {cfg.train_subset}")
    need(cfg.threads is None or cfg.threads >= 1, f"threads must be >= 1, got {cfg.threads}")
    need(cfg.packed in PACKED, f"packed must be auto, true or false, got {cfg.packed!r}")
    need(cfg.compile_mode in COMPILE_MODES,
         f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile_mode!r}")
    ts = cfg.time_scale
    need(ts == "auto" or (isinstance(ts, (int, float)) and ts > 0),
         f"time_scale must be 'auto' or a positive number, got {ts!r}")
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


@dataclass(frozen=True)
class TimeScale:
    """Stretches the paper's time constants to a run of a different length.

    Epoch-valued constants (ramp length, decay horizon) are multiplied by `epoch_factor`,
    per-epoch rates (beta) divided by it; the EMA horizon 1/(1-alpha), counted in steps,
    is multiplied by `step_factor`.  At the paper's full schedule both are 1."""

    epoch_factor: float = 1.0
    step_factor: float = 1.0

    @classmethod
    def for_run(cls, time_scale: Union[str, float], epochs: int, steps_per_epoch: int,
                paper_epochs: int, paper_steps_per_epoch: int) -> "TimeScale":
        if time_scale == "auto":
            return cls(epochs / paper_epochs, epochs * steps_per_epoch / (paper_epochs * paper_steps_per_epoch))
        return cls(float(time_scale), float(time_scale))

    def epochs(self, value: float) -> float:
        return value * self.epoch_factor

    def rate(self, per_epoch: float) -> float:
        return per_epoch / self.epoch_factor

    def ema_alpha(self, alpha: float) -> float:
        """alpha whose horizon 1/(1-alpha) is stretched by step_factor (at least one step)."""
        horizon = max(1.0, self.step_factor / (1.0 - alpha))
        return 1.0 - 1.0 / horizon
