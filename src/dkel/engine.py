"""The only training loop: data, method, optimizer, evaluation, checkpoints and logging.

Everything a method does happens through its interface (methods/base.py); everything
the loop does is here, in order: build, (resume | prepare), then per epoch train,
evaluate, check, checkpoint, log."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
import pickle
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from . import __version__, files, models, runtime
from .config import RESUMABLE_KEYS, TimeScale, to_dict
from .data.backend import DataBackend, open_backend
from .losses import label_smoothing
from .errors import ConfigError, DataError, DkelError, RunFolderError, Terminated, TrainingStopped
from .methods import METHODS, Method, Setup
from .models import check_spec
from .models.packing import packed_optimizer_state, parameter_map, unpacked_optimizer_state
from .progress import Progress
from .run_folder import FolderLock, RunFolder, shown

log = logging.getLogger("dkel")
# 2: weights-only loadable (no pickled numpy objects), reference loss for the divergence guard
CHECKPOINT_FORMAT = 2


# ----------------------------------------------------------------------------- building
@dataclass
class Built:
    data: DataBackend
    method: Method


def build(cfg: Any, rt: runtime.Runtime) -> Built:
    """The data backend over `cfg.dataset` and the method's modules."""
    cls = METHODS.get(cfg.method)
    check_spec(cfg.model, cfg.split)  # an unknown model is reported before any data is decoded
    if cfg.sync_bn and rt.distributed and rt.device.type != "cuda":
        raise DkelError("sync_bn needs CUDA devices (SyncBatchNorm does not run on CPU)")
    if cfg.peers < cls.min_peers:
        raise DkelError(f"method {cfg.method} needs peers >= {cls.min_peers}, got {cfg.peers}")
    cls.check(cfg)
    if cfg.batch_size % rt.world:
        raise DkelError(f"batch_size {cfg.batch_size} does not split evenly over {rt.world} processes")
    views = cls.view_count(cfg)

    def open_data(download: bool) -> DataBackend:
        return open_backend(cfg, views=views, device=rt.device, rank=rt.rank, world=rt.world,
                            channels_last=rt.channels_last, download=download)

    if rt.main:  # rank 0 decodes and caches first (and picks the backend); the others then follow
        data = open_data(cfg.download)
    # every process takes rank 0's backend, and config.yaml records it: a resume elsewhere makes the same
    cfg.data_backend = rank0_decides(data.kind if rt.main else None, rt)
    if not rt.main:
        data = open_data(False)
    if data.steps() == 0:
        raise DkelError(f"{data.train_size} training images make no batch of at least 2 per process")
    if data.test_size < rt.world:
        raise DkelError(f"{data.test_size} test images cannot be shared by {rt.world} processes")
    # counted as one process would, so the time constants do not depend on the number of processes
    steps_per_epoch = data.steps(world=1)
    time_scale = TimeScale.for_run(cfg.time_scale, cfg.epochs, steps_per_epoch,
                                   data.paper_epochs if cfg.paper_epochs is None else cfg.paper_epochs)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    setup = Setup(cfg.model, data.num_classes, data.in_channels, cfg.peers, cfg.epochs, steps_per_epoch, time_scale,
                  split=cfg.split, image_size=data.image_size)
    method = build_method(cfg, setup, rt)
    torch.manual_seed(cfg.seed * 1000 + rt.rank + 1)  # anything random from here on differs per process
    return Built(data, method)


PROBE_SIZE = 64  # images in the fixed batch the methods' end-of-epoch instruments measure on


def probe_batch(data: DataBackend) -> tuple[torch.Tensor, torch.Tensor]:
    """A small fixed batch of training views, the same every epoch and on every process: the start
    of the unsharded stream that training never draws from."""
    views, labels = next(data.prepare_batches())
    return views[:, :PROBE_SIZE], labels[:PROBE_SIZE]


def build_method(cfg: Any, setup: Setup, rt: runtime.Runtime) -> Method:
    """The method's modules on the device, packed as `cfg.packed` says (initialised unpacked, so
    packed and unpacked runs start from the same weights)."""
    method = METHODS.get(cfg.method)(cfg, setup).to(rt.device, memory_format=rt.memory_format)
    if models.pack_peers(method, cfg.packed, rt.device, sync_bn=cfg.sync_bn and rt.distributed):
        method.to(memory_format=rt.memory_format)  # the grouped weights
    return method


def lr_at(cfg: Any, epoch: float, steps_per_epoch: int) -> float:
    """The learning rate at a (fractional) epoch: a pure function, so nothing to checkpoint and
    the same schedule whatever the number of processes.  A warm-up multiplies the schedule by
    (steps taken including this one) / (warm-up steps) until that reaches 1."""
    if cfg.schedule == "cosine":
        lr = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch, cfg.epochs) / cfg.epochs))
    else:
        lr = cfg.lr * cfg.gamma ** sum(int(epoch) >= m for m in cfg.milestones)
    if cfg.warmup_epochs > 0:
        lr *= min(1.0, (round(epoch * steps_per_epoch) + 1) / (cfg.warmup_epochs * steps_per_epoch))
    return lr


def make_optimizer(cfg: Any, params, device: torch.device) -> torch.optim.Optimizer:
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, **kind)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0, **kind)


class Stepper:
    """One optimisation step of a method: losses, backward, optimizer, schedule, EMA.

    The training loop and `dkel bench` both step through this, so what is benchmarked
    is exactly what trains.  With `compile`, the whole step is one torch.compile'd function
    (PyTorch still splits it into a few graphs, at the backward call and around the optimizer
    step); the learning rate is then a device tensor updated in place, so the schedule does
    not recompile it (methods' own schedules stay symbolic: see losses._exp)."""

    def __init__(self, cfg: Any, method: Method, rt: runtime.Runtime):
        self.cfg, self.method, self.rt = cfg, method, rt
        self.optimizer = make_optimizer(cfg, method.student.parameters(), rt.device)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
        self.step = 0
        self._update = torch.compile(self._numbers_as_tensors, mode=cfg.compile_mode) if cfg.compile else self._step
        self._lr_tensors()

    def _lr_tensors(self) -> None:
        if self.cfg.compile:
            for group in self.optimizer.param_groups:
                group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32, device=self.rt.device)

    def __call__(self, views: torch.Tensor, labels: torch.Tensor, epoch: int, fraction: float = 0.0):
        """One step at `epoch` + `fraction` of it (which sets the learning rate and the method's weights)."""
        progress = epoch + fraction
        lr = lr_at(self.cfg, progress, self.method.setup.steps_per_epoch)
        for group in self.optimizer.param_groups:
            if self.cfg.compile:
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        # compiled, the progress and the step count are tensor inputs, so the schedules they drive (the
        # ramps, decays, the EMA warm-up) are computed in the graph instead of being baked in as
        # constants that recompile it as they move
        if self.cfg.compile:
            out = self._update(views, labels, torch.tensor(progress, dtype=torch.float64), torch.tensor(self.step))
        else:
            out = self._update(views, labels, progress, self.step)
        self.step += 1
        return out

    def _step(self, views: torch.Tensor, labels: torch.Tensor, progress: float, step: int):
        with self.rt.autocast():
            out = self.method.losses(views, labels, progress)
        self.scaler.scale(out.losses["loss"]).backward()
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.method.student.parameters(), self.cfg.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step(step)
        return out

    def _numbers_as_tensors(self, *args):
        """The step, returning its numbers (the loss terms' weights) as 0-d tensors: a Python float
        leaving a compiled graph is baked into it as a constant, which would recompile the step
        whenever a schedule moves the weight."""
        out = self._step(*args)
        return out._replace(losses={k: torch.as_tensor(v, dtype=torch.float32) if isinstance(v, float) else v
                                    for k, v in out.losses.items()})

    def state_dict(self) -> dict[str, Any]:
        """In the unpacked layout whether the student is packed or not, so a run resumes either way."""
        optimizer = unpacked_optimizer_state(parameter_map(self.method.student), self.optimizer.state_dict())
        return {"optimizer": optimizer, "scaler": self.scaler.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(packed_optimizer_state(parameter_map(self.method.student), state["optimizer"]))
        self._lr_tensors()
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]


WEIGHT_PREFIX = "w_"  # a StepOutput entry named w_<term> is a loss term's weight: logged as its last value


class EpochMeter:
    """Running sums of a training epoch, kept on the device (no host sync per step): the loss
    terms (logged as train_<name>) and the method's monitors (logged under their own names)."""

    def __init__(self, device: torch.device):
        self.sums: dict[str, torch.Tensor] = {}
        self.monitors: dict[str, torch.Tensor] = {}
        self.floats: dict[str, float] = {}
        self.correct = torch.zeros((), device=device)
        self.min_loss: Optional[torch.Tensor] = None  # lowest step loss, for the divergence guard
        self.steps = self.seen = 0

    @staticmethod
    def accumulate(store: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        value = value.detach()
        store[name] = store[name] + value if name in store else value.clone()

    def add(self, out, labels: torch.Tensor) -> None:
        logits = out.logits.detach()
        values = {**out.losses, "logit_norm": logits.float().norm(dim=-1).mean()}
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and not name.startswith(WEIGHT_PREFIX):
                self.accumulate(self.sums, name, value)
            else:
                self.floats[name] = value  # weights of the loss terms: the last value is the epoch's
        for name, value in out.monitors.items():
            self.accumulate(self.monitors, name, value)
        loss = out.losses["loss"].detach()
        self.min_loss = loss.clone() if self.min_loss is None else torch.minimum(self.min_loss, loss)
        self.correct += (logits.argmax(-1) == labels).sum()
        self.steps += 1
        self.seen += len(labels)

    def mean_loss(self) -> float:
        return self.sums["loss"].item() / self.steps

    def accuracy(self) -> float:
        return self.correct.item() / self.seen

    def row(self, rt: runtime.Runtime) -> dict[str, Any]:
        """Epoch means over every process."""
        names = [f"train_{n}" for n in self.sums] + list(self.monitors)
        totals = torch.stack([*(v.float() for v in (*self.sums.values(), *self.monitors.values())),
                              self.correct.float(), self.correct.new_tensor(float(self.seen))])
        if rt.distributed:
            dist.all_reduce(totals)
        means = dict(zip(names, (totals[:-2] / (self.steps * rt.world)).tolist()))
        train = {n: means.pop(n) for n in names[:len(self.sums)]}
        weights = {k: float(v) for k, v in self.floats.items()}
        return {**train, "train_acc": (totals[-2] / totals[-1]).item(), **weights, **means}


# ----------------------------------------------------------------------------- evaluation
TOP5 = "_top5"  # suffix of an output's top-5 accuracy (top-1 keeps the plain name)


@torch.no_grad()
def evaluate(method: Method, data: DataBackend, rt: runtime.Runtime, batch_size: int) -> dict[str, float]:
    """Top-1 (`<output>`) and top-5 (`<output>_top5`) accuracy of every reported output, exact across
    processes, plus group means/maxima."""
    was_training = method.training
    method.eval()
    correct: Optional[torch.Tensor] = None
    seen = 0
    names: list[str] = []
    for x, y in data.eval_batches(batch_size):
        with rt.autocast():
            outs = method.eval_logits(x)
        names = list(outs)
        hits = torch.stack([hits_at(logits, y) for logits in outs.values()])  # [outputs, 2]
        correct = hits if correct is None else correct + hits
        seen += len(y)  # images actually evaluated: none padded, unreadable ones (on_bad_image=skip) left out
    if correct is None:
        raise DkelError(f"process {rt.rank} has no readable test image to evaluate")
    counts = torch.cat([correct.double().T.flatten(),
                        torch.tensor([float(seen)], device=correct.device, dtype=torch.float64)])
    if rt.distributed:
        dist.all_reduce(counts)
    rates = (counts[:-1] / counts[-1]).tolist()
    acc: dict[str, float] = {}
    for suffix, values in (("", rates[:len(names)]), (TOP5, rates[len(names):])):
        one = dict(zip(names, values))
        for group, members in method.peer_groups().items():
            one[f"{group}_mean"] = sum(one[m] for m in members) / len(members)
            one[f"{group}_max"] = max(one[m] for m in members)
        acc.update({name + suffix: value for name, value in one.items()})
    method.train(was_training)
    return acc


def hits_at(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[top-1 hits, top-5 hits] of a batch (top-k with k = min(5, classes))."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    match = top == labels[:, None]
    return torch.stack([match[:, 0].sum(), match.any(-1).sum()])


# ----------------------------------------------------------------------------- checkpoints
def rng_state() -> dict[str, Any]:
    """Every random generator's state as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A dkel checkpoint, loaded without executing anything (weights_only): one that would need
    arbitrary unpickling is refused, never run."""
    try:
        with files.guarded(path, "read"):
            raw = Path(path).read_bytes()
        ckpt = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DkelError(f"refusing to load {path}: it needs arbitrary unpickling, which can run code; dkel "
                        "checkpoints never do (only load files you trust with torch.load yourself)") from None
    except DkelError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DkelError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise DkelError(f"{path} is not a dkel checkpoint")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise DkelError(f"{path} has checkpoint format {ckpt['format']}; this dkel ({__version__}) reads "
                        f"format {CHECKPOINT_FORMAT} (use the dkel version that wrote it)")
    return ckpt


def data_info(data: DataBackend) -> dict[str, Any]:
    """What a deployed network needs to know about its inputs, and what identifies the data."""
    return {"dataset": data.name, "classes": data.classes, "mean": list(data.mean), "std": list(data.std),
            "in_channels": data.in_channels, "image_size": data.image_size, "fingerprint": data.fingerprint}


def check_same_data(recorded: dict[str, Any], data: DataBackend, action: str) -> None:
    """Refuse data whose classes differ from the run's; warn when only the files differ."""
    old, new = list(recorded.get("classes") or []), list(data.classes)
    if old and old != new:
        detail = (f"the run has {len(old)} ({shown(old)}), the data has {len(new)} ({shown(new)})"
                  if len(old) != len(new) or set(old) != set(new) else "the same names in another order")
        raise DataError(f"the data's classes differ from the run's, so {action} would be meaningless: {detail}")
    if recorded.get("fingerprint") and recorded["fingerprint"] != data.fingerprint:
        log.warning("the %s data differs from the data the run trained on (same classes, other images)",
                    data.name)


def restore(run_dir: Path, which: str = "last", device: str = "auto"):
    """(config, method with the checkpoint's weights in eval mode, checkpoint, runtime) of a run folder."""
    from .run import resolve_run

    folder = RunFolder(Path(run_dir)).require_run()
    path = folder.best if which == "best" else folder.last
    if not path.is_file():
        raise DkelError(f"{run_dir} has no checkpoints/{path.name} yet (no epoch has finished)")
    ckpt = load_checkpoint(path)
    cfg = resolve_run([(str(folder.config), folder.effective_config())])
    precision = "auto" if cfg.precision == "fp16" and runtime.pick_device(device).type != "cuda" else cfg.precision
    rt = runtime.setup(device, precision, cfg.channels_last, cfg.threads)
    setup = Setup(**{**ckpt["setup"], "time": TimeScale.from_dict(ckpt["setup"]["time"])})
    method = build_method(cfg, setup, rt)  # packed as in training, so evaluation repeats its numbers
    load_state(method, ckpt["method"], path)
    method.eval()
    return cfg, method, ckpt, rt


def load_state(module: Any, state: dict[str, Any], path: Path) -> None:
    """load_state_dict, with a mismatch reported in one line."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0].rstrip(":. ")
        raise DkelError(f"{path} does not fit this run's modules ({first[:300]})") from None


def evaluate_run(run_dir: Path, which: str = "last", device: str = "auto") -> tuple[dict[str, float], str]:
    cfg, method, ckpt, rt = restore(run_dir, which, device)
    data = open_backend(cfg, views=1, device=rt.device, channels_last=rt.channels_last)
    try:
        check_same_data(ckpt["data"], data, "evaluating it")
        return evaluate(method, data, rt, cfg.eval_batch_size), method.deploy_metric
    finally:
        data.close()


# ----------------------------------------------------------------------------- logging
def environment(rt: runtime.Runtime) -> dict[str, Any]:
    import torchvision

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    device = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else platform.processor()
    return {"dkel": __version__, "git_sha": sha, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "platform": platform.platform(),
            "device": str(rt.device), "device_name": device or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "world_size": rt.world, "precision": str(rt.dtype),
            "channels_last": rt.channels_last, "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    files.write_csv(path, [columns, *([row.get(c, "") for c in columns] for row in history)])


# ----------------------------------------------------------------------------- run sessions
@dataclass
class Session:
    """One process's use of a run folder: its lock, log file, and how far training got."""

    folder: RunFolder
    lock: Optional[FolderLock] = None
    log_file: Optional[logging.Handler] = None
    finished: int = 0  # epochs with a checkpoint

    def kept(self) -> str:
        if self.finished:
            return f"the state after epoch {self.finished} is kept in {self.folder.last}"
        if self.folder.last.is_file():  # stopped between writing the checkpoint and counting it
            return f"the last finished epoch is kept in {self.folder.last}"
        return "no epoch had finished, so there is no checkpoint"

    def note(self, level: int, message: str) -> None:
        """A line for train.log only (the command line prints its own)."""
        if self.log_file is not None:
            self.log_file.handle(log.makeRecord(log.name, level, __file__, 0, message, None, None))

    def close(self) -> None:
        if self.log_file is not None:
            log.removeHandler(self.log_file)
            self.log_file.close()
            self.log_file = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def on_main(rt: runtime.Runtime, fn: Callable[[], Any]) -> Any:
    """fn() on rank 0 only; a DkelError there is raised on every process, so none is left waiting."""
    result, failure = None, None
    if rt.main:
        try:
            result = fn()
        except DkelError as e:
            failure = e
    message = rank0_decides(None if failure is None else str(failure), rt)
    if message is not None:
        raise failure if failure is not None else RunFolderError(message)
    return result


def resume_plan(folder: RunFolder, cfg: Any) -> tuple[Optional[dict[str, Any]], dict[str, tuple[Any, Any]]]:
    """(checkpoint or None, changed keys) of `--resume`, after checking that it may go ahead."""
    recorded = folder.effective_config()
    wanted = to_dict(cfg)
    changes = {k: (recorded[k], wanted[k]) for k in wanted if k in recorded and recorded[k] != wanted[k]}
    moved = [k for k in ("out", "runs_dir", "name") if k in changes]
    if moved:
        raise RunFolderError(f"--resume continues {folder.root} where it is; {', '.join(moved)} cannot "
                             "point elsewhere (copy the folder first to continue it somewhere else)")
    fixed = [k for k in changes if k not in RESUMABLE_KEYS]
    if fixed:
        detail = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in fixed[:6])
        raise RunFolderError(f"--resume cannot change what defines run {folder.root} ({detail}); start a new run "
                             "with another --out instead")
    ckpt = load_checkpoint(folder.last) if folder.last.is_file() else None
    if ckpt is None:
        if any(p.is_file() for p in (folder.metrics, folder.best, folder.results)):
            raise RunFolderError(f"{folder.last} is missing although {folder.root} has finished epochs; "
                                 "restore it, or start the run anew with --overwrite")
        log.warning("no epoch of %s had finished; starting it from the beginning", folder.root)
        return None, changes
    old = ckpt["config"]
    differs = [k for k in old if k in wanted and k not in RESUMABLE_KEYS and k not in ("out", "runs_dir", "name")
               and old[k] != recorded.get(k, old[k])]
    if differs:
        raise RunFolderError(f"{folder.last} belongs to another run ({shown([f'{k}={old[k]!r}' for k in differs])}, "
                             f"but config.yaml says {shown([f'{k}={recorded.get(k)!r}' for k in differs])})")
    done = ckpt["epoch"] + 1
    if cfg.epochs < done:
        raise RunFolderError(f"run {folder.root} has finished {done} epochs; epochs={cfg.epochs} would shorten "
                             "it (resume can only extend a run)")
    if cfg.epochs == done and folder.results.is_file():
        raise RunFolderError(f"run {folder.root} has already finished all {done} epochs; nothing to resume "
                             f"(extend it with --epochs N, N > {done})")
    return ckpt, changes


def open_fresh(folder: RunFolder, overwrite: bool) -> FolderLock:
    """Create (or, with overwrite, empty) the run folder and lock it; re-checked under the lock, so
    of two runs started on one folder at once only one goes ahead."""
    files.make_dir(folder.root)
    lock = folder.lock()
    try:
        folder.check_fresh(overwrite)
        if overwrite:
            folder.clear()
        folder.create()
    except BaseException:
        lock.release()
        raise
    return lock


def train(cfg: Any, *, resume: Optional[Path] = None, overwrite: bool = False) -> dict[str, Any]:
    """Train `cfg` to the end (or continue the run folder `resume`); returns results.json's content.

    Everything that can be checked is checked before anything is written: the folder may be used,
    a resumed run's checkpoint and data fit, and only then does the run folder change."""
    if resume is not None and overwrite:
        raise ConfigError("--resume and --overwrite cannot be combined")
    rt = runtime.setup(cfg.device, cfg.precision, cfg.channels_last, cfg.threads)
    folder = RunFolder(Path(resume)) if resume is not None else RunFolder.for_config(cfg)
    session = Session(folder)
    try:
        ckpt, changes = None, {}
        if resume is not None:
            session.lock = on_main(rt, lambda: folder.require_run().lock())
            ckpt, changes = resume_plan(folder, cfg)
        else:
            on_main(rt, lambda: folder.check_fresh(overwrite))
        built = build(cfg, rt)
        stepper = Stepper(cfg, built.method, rt)
        if ckpt is not None:
            check_same_data(ckpt["data"], built.data, "resuming it")
            load_state(built.method, ckpt["method"], folder.last)
            load_state(stepper, ckpt["stepper"], folder.last)
            session.finished = ckpt["epoch"] + 1
        if resume is None:
            session.lock = on_main(rt, lambda: open_fresh(folder, overwrite))
        on_main(rt, lambda: start_writing(session, cfg, rt, changes, resume is not None))
        rt.barrier()
        with label_smoothing(cfg.label_smoothing):
            return _train(cfg, rt, built, stepper, session, ckpt)
    except TrainingStopped as e:
        session.note(logging.ERROR, f"stopped: {e}")
        raise
    except (KeyboardInterrupt, Terminated) as e:
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated by SIGTERM"
        session.note(logging.WARNING, f"{what}; {session.kept()}")
        if folder.last.is_file():
            e.run_folder = folder.root  # for the command line's "continue with" hint
        raise
    except DkelError as e:
        session.note(logging.ERROR, f"error: {e}")
        raise
    finally:
        session.close()


def start_writing(session: Session, cfg: Any, rt: runtime.Runtime, changes: dict[str, tuple[Any, Any]],
                  resumed: bool) -> None:
    """The first writes of a run (or of its continuation): config, environment, session record, log."""
    folder = session.folder
    env = environment(rt)
    if resumed:
        folder.record_session("resume", after_epoch=session.finished, changed=changes, device=env["device_name"],
                              torch=env["torch"], dkel=__version__)
    else:
        files.write_text(folder.config, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        files.write_json(folder.env, env)
        folder.record_session("start", device=env["device_name"], torch=env["torch"], dkel=__version__)
    session.log_file = files.open_log(folder.log)
    log.addHandler(session.log_file)
    if changes:
        log.info("resumed with changes: %s", ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    if "epochs" in changes:
        log.warning("epochs changed from %s to %s: the learning-rate schedule and the scaled time constants "
                    "follow the new length from epoch %d on", *changes["epochs"], session.finished + 1)


def check_finite(loss_sum: torch.Tensor, rt: runtime.Runtime, epoch: int, step: int, session: Session) -> None:
    """Stop if the summed loss of any process is not finite (all processes decide together)."""
    finite = torch.isfinite(loss_sum).to(torch.int32)
    if rt.distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item():
        return
    value = loss_sum.item() if not torch.isfinite(loss_sum) else float("nan")
    raise TrainingStopped(f"loss became {value} in epoch {epoch + 1} (by step {step}); stopped, {session.kept()}")


def check_divergence(cfg: Any, meter: EpochMeter, reference: Optional[float], rt: runtime.Runtime, epoch: int,
                     session: Session) -> None:
    """Stop when every step of the epoch had a loss far above the run's first one (divergence short of NaN)."""
    if not cfg.divergence_check or reference is None or meter.min_loss is None:
        return
    lowest = meter.min_loss.clone().float()
    if rt.distributed:
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    lowest = lowest.item()
    if lowest > cfg.divergence_factor * reference:
        raise TrainingStopped(
            f"training diverged: every step of epoch {epoch + 1} had a loss above {cfg.divergence_factor:g} x its "
            f"starting value {reference:.4g} (lowest {lowest:.4g}); stopped, {session.kept()}. Lower lr, or set "
            "divergence_check=false")


def first_loss(loss: torch.Tensor, rt: runtime.Runtime) -> float:
    """The run's starting loss, the reference of the divergence guard (mean over processes)."""
    value = loss.detach().float().clone()
    if rt.distributed:
        dist.all_reduce(value)
        value /= rt.world
    return value.item()


def rank0_decides(value: Any, rt: runtime.Runtime) -> Any:
    """Rank 0's value on every process, so that all take the same branch."""
    if not rt.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


def _train(cfg, rt, built: Built, stepper: Stepper, session: Session, ckpt) -> dict[str, Any]:
    data, method, folder = built.data, built.method, session.folder
    history: list[dict[str, Any]] = []
    best = {"acc": -1.0, "epoch": None}
    start_epoch = 0
    reference: Optional[float] = None
    if ckpt is not None:
        set_rng_state(ckpt["rng"])
        history, best, start_epoch = ckpt["history"], ckpt["best"], ckpt["epoch"] + 1
        reference = ckpt["reference_loss"]
        log.info("resuming %s after epoch %d", folder.root, ckpt["epoch"] + 1)
    else:
        # every process prepares on the same full batches, so all end up identical
        method.prepare(data.prepare_batches())
        if rt.distributed:
            for tensor in method.state_dict().values():
                dist.broadcast(tensor, 0)
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if cfg.sync_bn:
            method.student = nn.SyncBatchNorm.convert_sync_batchnorm(method.student)
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        method.wrap("student", lambda m: DDP(m, device_ids=ids))
    consts = method.time_constants()
    if rt.main:
        log.info("run folder %s | %s on %s, %s, %d peers, %d train / %d test images, %d steps/epoch%s",
                 folder.root, cfg.method, cfg.model, cfg.dataset, cfg.peers, data.train_size,
                 data.test_size, data.steps(), f" | time constants {consts}" if consts else "")
        for warning in method.warnings():
            log.warning("warning: %s", warning)
    probe = probe_batch(data)
    tb = tensorboard_writer(folder) if cfg.tensorboard and rt.main else None
    for epoch in range(start_epoch, cfg.epochs):
        method.train()
        steps = data.steps()
        progress = Progress(cfg.progress if rt.main else "none", steps, f"epoch {epoch + 1}/{cfg.epochs}")
        meter = EpochMeter(rt.device)
        t0 = time.perf_counter()
        try:
            for views, labels in data.train_batches(epoch):
                out = stepper(views, labels, epoch, meter.steps / steps)
                meter.add(out, labels)
                if reference is None:
                    reference = first_loss(out.losses["loss"], rt)
                progress.advance()
                if progress.due():  # only rank 0 shows progress, so only a single process checks here
                    if not rt.distributed:
                        check_finite(meter.sums["loss"], rt, epoch, stepper.step, session)
                    progress.show({"loss": meter.mean_loss(), "acc": meter.accuracy(),
                                   "img/s": meter.steps * cfg.batch_size / (time.perf_counter() - t0)})
        finally:
            progress.close()
        train_time = time.perf_counter() - t0
        check_finite(meter.sums["loss"], rt, epoch, stepper.step, session)
        check_divergence(cfg, meter, reference, rt, epoch, session)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch, method.setup.steps_per_epoch),
                               **meter.row(rt)}
        row.update(method.epoch_diagnostics(probe, epoch + (meter.steps - 1) / meter.steps))
        if rt.distributed:
            sync_buffers(method)
        acc = evaluate(method, data, rt, cfg.eval_batch_size)
        row.update({f"test_{k}": v for k, v in acc.items()})
        row["deploy_acc"] = acc[method.deploy_metric]
        row["deploy_top5"] = acc[method.deploy_metric + TOP5]
        row["epoch_time_s"] = train_time
        row["img_per_s"] = data.train_size / train_time
        history.append(row)
        improved = row["deploy_acc"] > best["acc"]
        if improved:
            best = {"acc": row["deploy_acc"], "epoch": epoch + 1}
        collapse = rank0_decides(collapsed(row, data.num_classes) if cfg.collapse_check else None, rt)
        if rt.main:
            state = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "method": method.state_dict(),
                     "stepper": stepper.state_dict(), "rng": rng_state(), "history": history, "best": best,
                     "config": to_dict(cfg), "world_size": rt.world, "setup": dataclasses.asdict(method.setup),
                     "data": data_info(data), "reference_loss": reference}
            files.save_torch(state, folder.last)
            session.finished = epoch + 1
            if improved:
                files.save_torch(state, folder.best)
            write_metrics(folder.metrics, history)
            if tb:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        tb.add_scalar(k, v, epoch + 1)
            log.info("epoch %d/%d  loss %.4f  train acc %.4f  deploy acc %.4f (%s)  %.0f img/s  %.1fs",
                     epoch + 1, cfg.epochs, row["train_loss"], row["train_acc"], row["deploy_acc"],
                     method.deploy_metric, row["img_per_s"], train_time)
        if collapse:
            raise TrainingStopped(f"{collapse} at epoch {epoch + 1}; stopped, state kept in {folder.last}")
    results = summarize(cfg, method, history, best, rt)
    chance = at_chance(results["deploy_acc"], data.num_classes)
    if chance:
        results["warning"] = chance
        log.warning("warning: %s", chance)
    if data.skipped:
        results["skipped_images"] = list(data.skipped)
        log.warning("%d unreadable images were skipped: %s", len(data.skipped), ", ".join(data.skipped[:5]))
    if rt.distributed:
        results["ranks_identical"] = ranks_identical(method, rt.world)
        if not results["ranks_identical"]:
            log.warning("the processes ended with different weights; results come from rank 0")
    if rt.main:
        files.write_json(folder.results, results)
        from .plots import plot_run

        plot_run(history, method, folder.curves)
        log.info("done: deploy acc %.4f (best %.4f at epoch %s) -> %s", results["deploy_acc"],
                 results["best_deploy_acc"], best["epoch"], folder.root)
    if tb:
        tb.close()
    return results


def sync_buffers(method: Method) -> None:
    """Teachers' BatchNorm statistics follow each process's own batches; take rank 0's."""
    for buf in method.buffers():
        dist.broadcast(buf, 0)


def ranks_identical(method: Method, world: int) -> bool:
    """True if every process holds bitwise the same modules and buffers (students and teachers)."""
    h = hashlib.sha256()
    for name, tensor in method.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digests: list[Optional[str]] = [None] * world
    dist.all_gather_object(digests, h.hexdigest())
    return len(set(digests)) == 1


def collapsed(row: dict[str, Any], num_classes: int) -> Optional[str]:
    """The failure the DKEL paper describes: logits shrink to zero and accuracy falls to chance."""
    norm = row.get("student_logit_norm", row.get("train_logit_norm"))
    if norm is not None and norm < 0.05 and at_chance(row["deploy_acc"], num_classes):
        return (f"training collapsed (mean logit norm {norm:.3g}, deployed accuracy {row['deploy_acc']:.3f} "
                f"at chance {1 / num_classes:.3f})")
    return None


def at_chance(accuracy: float, num_classes: int) -> Optional[str]:
    """A finished run whose deployed network guesses: the collapse check misses slow collapses (logits
    shrinking over many epochs) and divergence_check=false lets a diverged run finish."""
    if accuracy <= 1.5 / num_classes:
        return (f"the deployed network ended at chance level: accuracy {accuracy:.4f} with {num_classes} classes "
                f"(chance {1 / num_classes:.4f}); the run did not learn: lower lr, or check the data and labels")
    return None


def summarize(cfg, method: Method, history, best, rt) -> dict[str, Any]:
    last = history[-1]
    tested = {k[len("test_"):]: v for k, v in last.items() if k.startswith("test_")}
    metrics = {k: v for k, v in tested.items() if not k.endswith(TOP5)}
    top5 = {k[:-len(TOP5)]: v for k, v in tested.items() if k.endswith(TOP5)}
    return {"method": cfg.method, "mode": method.mode, "model": cfg.model, "dataset": cfg.dataset,
            "seed": cfg.seed, "epochs": cfg.epochs, "peers": cfg.peers, "world_size": rt.world,
            "train_subset": cfg.train_subset, "deploy_output": method.deploy_metric,
            "deploy_acc": last["deploy_acc"], "deploy_top5": last["deploy_top5"], "best_deploy_acc": best["acc"],
            "best_epoch": best["epoch"], "metrics": metrics, "metrics_top5": top5, "time_constants": method.time_constants(),
            "train_time_s": sum(r["epoch_time_s"] for r in history)}


def tensorboard_writer(folder: RunFolder):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DkelError("tensorboard=true needs TensorBoard: pip install 'dkel[tensorboard]'") from None
    return SummaryWriter(str(folder.root / "tensorboard"))
