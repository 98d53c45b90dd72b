"""Run configuration: typed dataclasses, YAML files and `key=value` overrides.

One flat namespace: the engine's fields (`TrainConfig`) plus the chosen method's
hyperparameters (its own `Config` dataclass, defined next to the method).  Values
are resolved in order: dataclass defaults < YAML file < command-line flags < overrides."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

SCHEDULES = ("cosine", "multistep")
OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PROGRESS = ("auto", "bar", "lines", "none")
DATA_BACKENDS = ("auto", "resident", "stream")
RECIPES = ("auto", "cifar", "imagenet")
ON_BAD_IMAGE = ("error", "skip")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PACKED = ("auto", True, False)


@dataclass
class TrainConfig:
    # what to train
    method: str = "dkel"
    # a zoo name, torchvision:NAME, timm:NAME or module:attribute (a callable num_classes -> nn.Module);
    # whole-network methods (independent, dml, kdcl) also take a list, one per peer
    model: Union[str, list[str]] = "resnet8"
    split: Optional[str] = None  # branched methods: first tail module of a foreign network (default: its last stage)
    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None  # resize image files to this square size
    train_subset: Optional[int] = None  # class-balanced subset of the training split
    cache_dir: Optional[str] = None  # decoded-dataset cache (default ~/.cache/dkel)
    # resident: decoded data on the device; stream: read by loader workers as training goes;
    # auto: resident when the decoded data fits comfortably (the choice is logged and recorded)
    data_backend: str = "auto"
    recipe: str = "auto"  # augmentation: auto (the dataset's) | cifar | imagenet
    num_workers: Optional[int] = None  # stream loader processes per training process (default: from the CPUs)
    on_bad_image: str = "error"  # error | skip (skipped images are logged and listed in results.json)
    peers: int = 3
    # recipe (SPEC section 6)
    epochs: int = 30
    batch_size: int = 128  # global batch, split across processes
    lr: float = 0.1
    optimizer: str = "sgd"  # sgd | adamw
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8  # adamw
    schedule: str = "cosine"  # cosine | multistep
    milestones: list[int] = field(default_factory=lambda: [150, 225])  # multistep, in epochs
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up of the learning rate over the first epochs (by step)
    label_smoothing: float = 0.0  # of every cross-entropy term against the labels
    grad_clip: Optional[float] = None  # clip the gradient's global norm to this
    # "auto" scales ramp-up, decay and EMA horizons by epochs / paper_epochs (exactly 1 at the
    # paper's length, whatever the batch size, subset or processes); a number scales them by it
    time_scale: Union[str, int, float] = "auto"
    # the schedule length the paper's time constants belong to; default: the dataset's recipe
    # (CIFAR 300, TinyImageNet 100; see `dkel list`); a dataset without one is not scaled unless set
    paper_epochs: Optional[int] = None
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
    collapse_check: bool = True  # stop when logits collapse to zero at chance accuracy
    # stop when every step of an epoch has a loss above divergence_factor x the run's first loss
    divergence_check: bool = True
    divergence_factor: float = 10.0
    # plugins: modules or .py files imported before anything is built (recorded, re-imported by eval/export)
    imports: list[str] = field(default_factory=list)
    # output
    out: Optional[str] = None  # exact run folder; default runs/<dataset>/<method>-<model>/<name>-seed<k>
    runs_dir: str = "runs"
    name: Optional[str] = None  # default: the method's mode, else "default"
    tensorboard: bool = False
    progress: str = "auto"  # auto | bar | lines | none


# keys that `--resume` may change (recorded in the run's sessions.jsonl); every other key defines the
# run, and a resume that changes one is refused
# how a run executes, not what it computes: compare ignores them when matching configs
EXECUTION_KEYS = frozenset({
    "device", "channels_last", "compile", "compile_mode", "threads", "eval_batch_size", "progress",
    "tensorboard", "data_dir", "download", "cache_dir", "data_backend", "num_workers", "packed"})
RESUMABLE_KEYS = EXECUTION_KEYS | {"epochs", "precision", "collapse_check", "divergence_check", "divergence_factor",
                                   "on_bad_image"}


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
    if isinstance(cfg.model, list):
        need(len(cfg.model) == cfg.peers, f"model lists {len(cfg.model)} networks for peers={cfg.peers}; "
                                          f"give one per peer")
        need(cfg.split is None, "split applies to branched methods; a list of models trains whole networks")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {cfg.eval_batch_size}")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"lr must be a positive number, got {cfg.lr}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(0 <= cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum}")
    need(cfg.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    need(len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas), f"betas must be two numbers in [0, 1), got {cfg.betas}")
    need(cfg.eps > 0, f"eps must be > 0, got {cfg.eps}")
    need(cfg.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
    need(0 <= cfg.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    need(cfg.grad_clip is None or cfg.grad_clip > 0, f"grad_clip must be > 0 (or null), got {cfg.grad_clip}")
    need(cfg.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    need(cfg.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    need(cfg.progress in PROGRESS, f"progress must be one of {', '.join(PROGRESS)}, got {cfg.progress!r}")
    need(cfg.train_subset is None or cfg.train_subset >= 1, f"train_subset must be >= 1, got {cfg.train_subset}")
    need(cfg.threads is None or cfg.threads >= 1, f"threads must be >= 1, got {cfg.threads}")
    need(cfg.data_backend in DATA_BACKENDS,
         f"data_backend must be one of {', '.join(DATA_BACKENDS)}, got {cfg.data_backend!r}")
    need(cfg.recipe in RECIPES, f"recipe must be one of {', '.join(RECIPES)}, got {cfg.recipe!r}")
    need(cfg.on_bad_image in ON_BAD_IMAGE,
         f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {cfg.on_bad_image!r}")
    need(cfg.num_workers is None or cfg.num_workers >= 0, f"num_workers must be >= 0, got {cfg.num_workers}")
    need(cfg.divergence_factor > 1, f"divergence_factor must be > 1, got {cfg.divergence_factor}")
    need(cfg.packed in PACKED, f"packed must be auto, true or false, got {cfg.packed!r}")
    need(cfg.compile_mode in COMPILE_MODES,
         f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile_mode!r}")
    ts = cfg.time_scale
    need(ts == "auto" or (isinstance(ts, (int, float)) and not isinstance(ts, bool) and ts > 0),
         f"time_scale must be 'auto' or a positive number, got {ts!r}")
    need(cfg.paper_epochs is None or cfg.paper_epochs >= 1, f"paper_epochs must be >= 1, got {cfg.paper_epochs}")
    return cfg


def model_slug(model: Any) -> str:
    """A `model` (or `dataset`) key as a file name: torchvision:resnet18 -> torchvision-resnet18, a list
    joined by '+'."""
    names = model if isinstance(model, (list, tuple)) else [model]
    return "+".join(re.sub(r"[^A-Za-z0-9._-]+", "-", n if isinstance(n, str) else getattr(n, "__name__", "model"))
                    for n in names)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


EMA_FLOOR_STEPS = 100  # a shorter EMA horizon makes the teacher a copy of its student
EMA_FLOOR_FRACTION = 1 / 3  # ... unless the run is shorter: then a third of it (alpha^T = e^-3 at the end)


@dataclass(frozen=True)
class TimeScale:
    """Stretches the paper's time constants to a run of a different length.

    Epoch-valued constants (ramp length, decay horizon) are multiplied by `factor`,
    per-epoch rates (beta) divided by it, and the EMA horizon 1/(1-alpha), counted in
    steps, multiplied by it too, but never below `ema_floor` steps.  With factor 1 every
    constant is the paper's and weights change at epoch boundaries, as in the paper;
    otherwise they are evaluated at fractional progress, so every curve keeps its shape."""

    factor: float = 1.0
    run_steps: int = 0  # optimizer steps of the whole run (0: unknown, no floor)
    paper_epochs: Optional[int] = None  # what `auto` measured the run against (None: not auto)

    @classmethod
    def for_run(cls, time_scale: Union[str, float], epochs: int, steps_per_epoch: int,
                paper_epochs: Optional[int]) -> "TimeScale":
        run_steps = epochs * steps_per_epoch
        if time_scale != "auto":
            return cls(float(time_scale), run_steps)
        if paper_epochs is None:  # no recipe to measure against: the paper's constants as they are
            return cls(1.0, run_steps)
        return cls(epochs / paper_epochs, run_steps, paper_epochs)

    @classmethod
    def from_dict(cls, values: dict) -> "TimeScale":
        """From a checkpoint's `setup.time` (keys of older versions are ignored)."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    @property
    def scaled(self) -> bool:
        return self.factor != 1.0

    def at(self, progress: Any) -> Any:
        """The epoch at which weights are evaluated after `progress` (epoch + fraction of it) epochs
        (a float, or a 0-d tensor in the compiled step)."""
        if self.scaled:
            return progress
        return progress.floor() if hasattr(progress, "floor") else float(math.floor(progress))

    def paper_epoch(self, progress: Any) -> Any:
        """The integer epoch of a paper-length run that `progress` of this run corresponds to."""
        value = progress / self.factor + 1e-9
        return value.floor() if hasattr(value, "floor") else math.floor(value)

    def describe(self) -> dict[str, Any]:
        """The scale and where it came from, for the log and results.json."""
        out: dict[str, Any] = {"time_scale": self.factor}
        if self.paper_epochs is not None:
            out["paper_epochs"] = self.paper_epochs
        out["weights_at"] = "fractional epoch" if self.scaled else "epoch start"
        return out

    def epochs(self, value: float) -> float:
        return value * self.factor

    def rate(self, per_epoch: float) -> float:
        return per_epoch / self.factor

    @property
    def ema_floor(self) -> float:
        """The shortest EMA horizon (steps) scaling may produce: 100 steps, or a third of a shorter run."""
        return min(EMA_FLOOR_STEPS, self.run_steps * EMA_FLOOR_FRACTION) if self.run_steps else 0.0

    def ema_horizon(self, alpha: float) -> float:
        """The horizon 1/(1-alpha) in steps, stretched by `factor`; scaling never shortens it below
        `ema_floor` (nor below the unscaled horizon, if that is shorter still)."""
        horizon = 1.0 / (1.0 - alpha)
        if not self.scaled:
            return horizon
        return max(horizon * self.factor, min(horizon, self.ema_floor), 1.0)

    def ema_alpha(self, alpha: float) -> float:
        return 1.0 - 1.0 / self.ema_horizon(alpha) if self.scaled else alpha
