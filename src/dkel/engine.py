"""The only training loop: data, method, optimizer, evaluation, checkpoints and logging.

Everything a method does happens through its interface (methods/base.py); everything
the loop does is here, in order: build, (resume | prepare), then per epoch train,
evaluate, check, checkpoint, log."""
from __future__ import annotations

import csv
import hashlib
import dataclasses
import json
import logging
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from . import __version__, models, runtime
from .config import TimeScale, to_dict
from .data import ImageData, ViewLoader, atomic_save, eval_batches, load_dataset
from .errors import DkelError, TrainingStopped
from .methods import METHODS, Method, Setup
from .models import MODELS
from .models.packing import packed_optimizer_state, parameter_map, unpacked_optimizer_state
from .progress import Progress

log = logging.getLogger("dkel")
CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------- run folder
@dataclass
class RunFolder:
    root: Path

    config = property(lambda self: self.root / "config.yaml")
    env = property(lambda self: self.root / "env.json")
    metrics = property(lambda self: self.root / "metrics.csv")
    log = property(lambda self: self.root / "train.log")
    results = property(lambda self: self.root / "results.json")
    curves = property(lambda self: self.root / "curves.png")
    last = property(lambda self: self.root / "checkpoints" / "last.pt")
    best = property(lambda self: self.root / "checkpoints" / "best.pt")

    @classmethod
    def for_config(cls, cfg: Any, tag: str) -> "RunFolder":
        if cfg.out:
            return cls(Path(cfg.out))
        name = cfg.name or tag
        return cls(Path(cfg.runs_dir) / cfg.dataset / f"{cfg.method}-{cfg.model}" / f"{name}-seed{cfg.seed}")

    def is_run(self) -> bool:
        return self.config.is_file()


# ----------------------------------------------------------------------------- building
@dataclass
class Built:
    data: ImageData
    loader: ViewLoader
    method: Method


def build(cfg: Any, rt: runtime.Runtime) -> Built:
    """Data on the device, its loader, and the method's modules."""
    cls = METHODS.get(cfg.method)
    MODELS.get(cfg.model)  # an unknown model is reported before any data is decoded
    if cfg.sync_bn and rt.distributed and rt.device.type != "cuda":
        raise DkelError("sync_bn needs CUDA devices (SyncBatchNorm does not run on CPU)")
    if cfg.peers < cls.min_peers:
        raise DkelError(f"method {cfg.method} needs peers >= {cls.min_peers}, got {cfg.peers}")
    cls.check(cfg)
    if rt.main:  # rank 0 decodes and caches first; the others then read the cache
        data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, image_size=cfg.image_size,
                            train_subset=cfg.train_subset, cache_dir=cfg.cache_dir)
    rt.barrier()
    if not rt.main:
        data = load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size,
                            train_subset=cfg.train_subset, cache_dir=cfg.cache_dir)
    if cfg.batch_size % rt.world:
        raise DkelError(f"batch_size {cfg.batch_size} does not split evenly over {rt.world} processes")
    data.to(rt.device)
    loader = ViewLoader(data.train_images, data.train_labels, batch_size=cfg.batch_size,
                        views=1 if cls.shared_view else cfg.peers, pad=data.pad, flip=data.flip,
                        mean=data.mean, std=data.std, seed=cfg.seed, rank=rt.rank, world=rt.world,
                        channels_last=rt.channels_last)
    if len(loader) == 0:
        raise DkelError(f"{len(data.train_labels)} training images make no batch of at least 2 per process")
    spec = data.spec
    # counted as one process would, so the time constants do not depend on the number of processes
    steps_per_epoch = len(loader.unsharded())
    time_scale = TimeScale.for_run(cfg.time_scale, cfg.epochs, steps_per_epoch, spec.paper_epochs,
                                   spec.paper_steps_per_epoch)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    setup = Setup(cfg.model, data.num_classes, data.in_channels, cfg.peers, cfg.epochs, steps_per_epoch, time_scale)
    method = build_method(cfg, setup, rt)
    torch.manual_seed(cfg.seed * 1000 + rt.rank + 1)  # anything random from here on differs per process
    return Built(data, loader, method)


def build_method(cfg: Any, setup: Setup, rt: runtime.Runtime) -> Method:
    """The method's modules on the device, packed as `cfg.packed` says (initialised unpacked, so
    packed and unpacked runs start from the same weights)."""
    method = METHODS.get(cfg.method)(cfg, setup).to(rt.device, memory_format=rt.memory_format)
    if models.pack_peers(method, cfg.packed, rt.device, sync_bn=cfg.sync_bn and rt.distributed):
        method.to(memory_format=rt.memory_format)  # the grouped weights
    return method


def lr_at(cfg: Any, epoch: float) -> float:
    """The learning rate at a (fractional) epoch: a pure function, so nothing to checkpoint and
    the same schedule whatever the number of processes."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch, cfg.epochs) / cfg.epochs))
    return cfg.lr * cfg.gamma ** sum(int(epoch) >= m for m in cfg.milestones)


def make_optimizer(cfg: Any, params, device: torch.device) -> torch.optim.Optimizer:
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
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
        self._update = torch.compile(self._step, mode=cfg.compile_mode) if cfg.compile else self._step
        self._lr_tensors()

    def _lr_tensors(self) -> None:
        if self.cfg.compile:
            for group in self.optimizer.param_groups:
                group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32, device=self.rt.device)

    def __call__(self, views: torch.Tensor, labels: torch.Tensor, epoch: int, fraction: float = 0.0):
        """One step at `epoch` + `fraction` of it (which sets the learning rate)."""
        lr = lr_at(self.cfg, epoch + fraction)
        for group in self.optimizer.param_groups:
            if self.cfg.compile:
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        out = self._update(views, labels, epoch, self.step)
        self.step += 1
        return out

    def _step(self, views: torch.Tensor, labels: torch.Tensor, epoch: int, step: int):
        with self.rt.autocast():
            out = self.method.losses(views, labels, epoch)
        self.scaler.scale(out.losses["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step(step)
        return out

    def state_dict(self) -> dict[str, Any]:
        """In the unpacked layout whether the student is packed or not, so a run resumes either way."""
        optimizer = unpacked_optimizer_state(parameter_map(self.method.student), self.optimizer.state_dict())
        return {"optimizer": optimizer, "scaler": self.scaler.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(packed_optimizer_state(parameter_map(self.method.student), state["optimizer"]))
        self._lr_tensors()
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]


class EpochMeter:
    """Running sums of a training epoch, kept on the device (no host sync per step): the loss
    terms (logged as train_<name>) and the method's monitors (logged under their own names)."""

    def __init__(self, device: torch.device):
        self.sums: dict[str, torch.Tensor] = {}
        self.monitors: dict[str, torch.Tensor] = {}
        self.floats: dict[str, float] = {}
        self.correct = torch.zeros((), device=device)
        self.steps = self.seen = 0

    @staticmethod
    def accumulate(store: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        value = value.detach()
        store[name] = store[name] + value if name in store else value.clone()

    def add(self, out, labels: torch.Tensor) -> None:
        logits = out.logits.detach()
        values = {**out.losses, "logit_norm": logits.float().norm(dim=-1).mean()}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                self.accumulate(self.sums, name, value)
            else:
                self.floats[name] = value  # weights of the loss terms: the last value is the epoch's
        for name, value in out.monitors.items():
            self.accumulate(self.monitors, name, value)
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
        return {**train, "train_acc": (totals[-2] / totals[-1]).item(), **self.floats, **means}


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(method: Method, data: ImageData, rt: runtime.Runtime, batch_size: int) -> dict[str, float]:
    """Top-1 accuracy of every reported output, exact across processes, plus group means/maxima."""
    was_training = method.training
    method.eval()
    correct: Optional[torch.Tensor] = None
    names: list[str] = []
    for x, y in eval_batches(data.test_images, data.test_labels, batch_size=batch_size, mean=data.mean,
                             std=data.std, rank=rt.rank, world=rt.world, channels_last=rt.channels_last):
        with rt.autocast():
            outs = method.eval_logits(x)
        names = list(outs)
        hits = torch.stack([(logits.argmax(-1) == y).sum() for logits in outs.values()])
        correct = hits if correct is None else correct + hits
    counts = torch.cat([correct.double(), torch.tensor([0.0], device=correct.device, dtype=torch.float64)])
    counts[-1] = len(range(rt.rank, len(data.test_labels), rt.world))
    if rt.distributed:
        dist.all_reduce(counts)
    acc = dict(zip(names, (counts[:-1] / counts[-1]).tolist()))
    for group, members in method.peer_groups().items():
        values = [acc[m] for m in members]
        acc[f"{group}_mean"] = sum(values) / len(values)
        acc[f"{group}_max"] = max(values)
    method.train(was_training)
    return acc


# ----------------------------------------------------------------------------- checkpoints
def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise DkelError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DkelError(f"{path} is not a dkel checkpoint")
    return ckpt


def data_info(data: ImageData) -> dict[str, Any]:
    """What a deployed network needs to know about its inputs."""
    return {"dataset": data.name, "classes": data.classes, "mean": list(data.mean), "std": list(data.std),
            "in_channels": data.in_channels, "image_size": data.image_size}


def restore(run_dir: Path, which: str = "last", device: str = "auto"):
    """(config, method with the checkpoint's weights in eval mode, checkpoint, runtime) of a run folder."""
    from .config import load_yaml, resolve
    from .methods import method_configs

    folder = RunFolder(Path(run_dir))
    if not folder.is_run():
        raise DkelError(f"{run_dir} is not a run folder (no config.yaml)")
    path = folder.best if which == "best" else folder.last
    if not path.is_file():
        raise DkelError(f"{run_dir} has no checkpoints/{path.name} yet (no epoch has finished)")
    ckpt = load_checkpoint(path)
    cfg = resolve([(str(folder.config), load_yaml(folder.config))], method_configs())
    precision = "auto" if cfg.precision == "fp16" and runtime.pick_device(device).type != "cuda" else cfg.precision
    rt = runtime.setup(device, precision, cfg.channels_last, cfg.threads)
    setup = Setup(**{**ckpt["setup"], "time": TimeScale(**ckpt["setup"]["time"])})
    method = build_method(cfg, setup, rt)  # packed as in training, so evaluation repeats its numbers
    method.load_state_dict(ckpt["method"])
    method.eval()
    return cfg, method, ckpt, rt


def evaluate_run(run_dir: Path, which: str = "last", device: str = "auto") -> tuple[dict[str, float], str]:
    cfg, method, _, rt = restore(run_dir, which, device)
    data = load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, cache_dir=cfg.cache_dir)
    data.to(rt.device)
    return evaluate(method, data, rt, cfg.eval_batch_size), method.deploy_metric


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


def attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- training
def check_finite(loss_sum: torch.Tensor, rt: runtime.Runtime, epoch: int, step: int, folder: RunFolder,
                 last_good: Optional[int]) -> None:
    """Stop if the summed loss of any process is not finite (all processes decide together)."""
    finite = torch.isfinite(loss_sum).to(torch.int32)
    if rt.distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item():
        return
    kept = (f"the last good state is {folder.last} (end of epoch {last_good + 1})" if last_good is not None
            else "no checkpoint had been written yet")
    value = loss_sum.item() if not torch.isfinite(loss_sum) else float("nan")
    raise TrainingStopped(f"loss became {value} in epoch {epoch + 1} (by step {step}); stopped, {kept}")


def rank0_decides(value: Any, rt: runtime.Runtime) -> Any:
    """Rank 0's value on every process, so that all take the same branch."""
    if not rt.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


def train(cfg: Any, *, resume: Optional[Path] = None, overwrite: bool = False) -> dict[str, Any]:
    """Train `cfg` to the end (or continue the run folder `resume`); returns results.json's content."""
    rt = runtime.setup(cfg.device, cfg.precision, cfg.channels_last, cfg.threads)
    built = build(cfg, rt)
    data, loader, method = built.data, built.loader, built.method
    folder = RunFolder(resume) if resume else RunFolder.for_config(cfg, method.run_tag())
    ckpt = load_checkpoint(folder.last) if resume and folder.last.is_file() else None
    if not resume and folder.root.exists() and any(folder.root.iterdir()):
        if not overwrite:
            raise DkelError(f"run folder {folder.root} already exists; continue it with --resume "
                            f"{folder.root} or replace it with --overwrite")
        if rt.main:
            shutil.rmtree(folder.root)
    rt.barrier()
    handler = None
    if rt.main:
        folder.root.mkdir(parents=True, exist_ok=True)
        (folder.root / "checkpoints").mkdir(exist_ok=True)
        handler = attach_log_file(folder.log)
        folder.config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        env = environment(rt)
        if folder.env.is_file():  # resumed: keep where the run started, log where it continues
            log.info("continuing on %s (%s, torch %s)", env["device_name"], env["device"], env["torch"])
        else:
            folder.env.write_text(json.dumps(env, indent=2))
    try:
        return _train(cfg, rt, data, loader, method, folder, ckpt)
    finally:
        if handler:
            log.removeHandler(handler)
            handler.close()


def _train(cfg, rt, data, loader, method, folder, ckpt) -> dict[str, Any]:
    stepper = Stepper(cfg, method, rt)
    history: list[dict[str, Any]] = []
    best = {"acc": -1.0, "epoch": None}
    start_epoch = 0
    if ckpt is not None:
        method.load_state_dict(ckpt["method"])
        stepper.load_state_dict(ckpt["stepper"])
        set_rng_state(ckpt["rng"])
        history, best, start_epoch = ckpt["history"], ckpt["best"], ckpt["epoch"] + 1
        log.info("resuming %s after epoch %d", folder.root, ckpt["epoch"] + 1)
    else:
        # every process prepares on the same full batches, so all end up identical
        method.prepare(loader.unsharded().stream(-1))
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
                 folder.root, cfg.method, cfg.model, cfg.dataset, cfg.peers, len(data.train_labels),
                 len(data.test_labels), len(loader), f" | time constants {consts}" if consts else "")
    tb = tensorboard_writer(folder) if cfg.tensorboard and rt.main else None
    for epoch in range(start_epoch, cfg.epochs):
        method.train()
        loader.set_epoch(epoch)
        progress = Progress(cfg.progress if rt.main else "none", len(loader), f"epoch {epoch + 1}/{cfg.epochs}")
        meter = EpochMeter(rt.device)
        t0 = time.perf_counter()
        for views, labels in loader:
            meter.add(stepper(views, labels, epoch, meter.steps / len(loader)), labels)
            progress.advance()
            if progress.due():  # only rank 0 shows progress, so only a single process checks here
                if not rt.distributed:
                    check_finite(meter.sums["loss"], rt, epoch, stepper.step, folder, last_checkpointed(history))
                progress.show({"loss": meter.mean_loss(), "acc": meter.accuracy(),
                               "img/s": meter.steps * cfg.batch_size / (time.perf_counter() - t0)})
        train_time = time.perf_counter() - t0
        progress.close()
        check_finite(meter.sums["loss"], rt, epoch, stepper.step, folder, last_checkpointed(history))
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch), **meter.row(rt)}
        row.update(method.epoch_diagnostics())
        if rt.distributed:
            sync_buffers(method)
        acc = evaluate(method, data, rt, cfg.eval_batch_size)
        row.update({f"test_{k}": v for k, v in acc.items()})
        row["deploy_acc"] = acc[method.deploy_metric]
        row["epoch_time_s"] = train_time
        row["img_per_s"] = len(loader.labels) / train_time
        history.append(row)
        improved = row["deploy_acc"] > best["acc"]
        if improved:
            best = {"acc": row["deploy_acc"], "epoch": epoch + 1}
        collapse = rank0_decides(collapsed(row, data.num_classes) if cfg.collapse_check else None, rt)
        if rt.main:
            state = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "method": method.state_dict(),
                     "stepper": stepper.state_dict(), "rng": rng_state(), "history": history, "best": best,
                     "config": to_dict(cfg), "world_size": rt.world, "setup": dataclasses.asdict(method.setup),
                     "data": data_info(data)}
            atomic_save(state, folder.last)
            if improved:
                atomic_save(state, folder.best)
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
    if rt.distributed:
        results["ranks_identical"] = ranks_identical(method, rt.world)
        if not results["ranks_identical"]:
            log.warning("the processes ended with different weights; results come from rank 0")
    if rt.main:
        folder.results.write_text(json.dumps(results, indent=2))
        from .plots import plot_run

        plot_run(history, method, folder.curves)
        log.info("done: deploy acc %.4f (best %.4f at epoch %s) -> %s", results["deploy_acc"],
                 results["best_deploy_acc"], best["epoch"], folder.root)
    if tb:
        tb.close()
    return results


def last_checkpointed(history: list[dict[str, Any]]) -> Optional[int]:
    """0-based index of the last epoch that has a checkpoint (the last completed one)."""
    return len(history) - 1 if history else None


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
    if norm is not None and norm < 0.05 and row["deploy_acc"] <= 1.5 / num_classes:
        return (f"training collapsed (mean logit norm {norm:.3g}, deployed accuracy {row['deploy_acc']:.3f} "
                f"at chance {1 / num_classes:.3f})")
    return None


def summarize(cfg, method: Method, history, best, rt) -> dict[str, Any]:
    last = history[-1]
    metrics = {k[len("test_"):]: v for k, v in last.items() if k.startswith("test_")}
    return {"method": cfg.method, "mode": method.mode, "model": cfg.model, "dataset": cfg.dataset,
            "seed": cfg.seed, "epochs": cfg.epochs, "peers": cfg.peers, "world_size": rt.world,
            "train_subset": cfg.train_subset, "deploy_output": method.deploy_metric,
            "deploy_acc": last["deploy_acc"], "best_deploy_acc": best["acc"], "best_epoch": best["epoch"],
            "metrics": metrics, "time_constants": method.time_constants(),
            "train_time_s": sum(r["epoch_time_s"] for r in history)}


def tensorboard_writer(folder: RunFolder):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DkelError("tensorboard=true needs TensorBoard: pip install 'dkel[tensorboard]'") from None
    return SummaryWriter(str(folder.root / "tensorboard"))
