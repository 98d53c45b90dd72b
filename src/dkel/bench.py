"""`dkel bench`: training throughput of a full step, always against a plain network in the same process.

A step is exactly the engine's (`Stepper`: losses, backward, optimizer, schedule, EMA).
One sample is one image with its K views.  The plain reference is a single network of
the same model trained with cross-entropy through the same code path (the `independent`
method with one peer); the two are timed in interleaved rounds so drift hits both."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import runtime
from .config import TimeScale, parse_overrides, resolve
from .data import ViewLoader
from .engine import Stepper, build_method
from .errors import DkelError
from .methods import METHODS, Setup, method_configs
from .models import MODELS


def rss_kib(field: str = "VmRSS") -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


@dataclass
class Subject:
    """A method being timed: its step function and where its batches come from."""

    name: str
    step: Callable[[], Any]


def build_subject(values: dict[str, Any], rt: runtime.Runtime, classes: int, batch: int,
                  end_to_end: bool) -> Subject:
    cfg = resolve([("bench", values)], method_configs())
    cls = METHODS.get(cfg.method)
    cls.check(cfg)
    # the zoo's design resolution; foreign networks (torchvision:, timm:, ...) at CIFAR's
    size = MODELS.get(cfg.model).input_size if isinstance(cfg.model, str) and cfg.model in MODELS else 32
    torch.manual_seed(0)
    setup = Setup(cfg.model, classes, 3, cfg.peers, cfg.epochs, 391, TimeScale(), split=cfg.split, image_size=size)
    method = build_method(cfg, setup, rt).train()
    views = cls.view_count(cfg)
    stepper = Stepper(cfg, method, rt)
    epoch = 100  # past the ramp-up and the decaying ensemble, as the released code's benchmark
    g = torch.Generator().manual_seed(0)
    if end_to_end:  # the real pipeline on a CIFAR-sized uint8 set resident on the device
        images = torch.randint(0, 256, (50_000, 3, size, size), generator=g, dtype=torch.uint8).to(rt.device)
        labels = torch.randint(0, classes, (50_000,), generator=g).to(rt.device)
        loader = ViewLoader(images, labels, batch_size=batch, views=views, pad=4, flip=True, mean=(0.5,) * 3,
                            std=(0.25,) * 3, seed=0, channels_last=rt.channels_last)
        state = {"it": iter(loader), "epoch": 0}

        def next_batch():
            try:
                return next(state["it"])
            except StopIteration:
                state["epoch"] += 1
                state["it"] = loader.batches(state["epoch"])
                return next(state["it"])
    else:
        x = torch.randn(views, batch, size, size, 3, generator=g).permute(0, 1, 4, 2, 3)
        if not rt.channels_last:
            x = x.contiguous()
        fixed = (x.to(rt.device), torch.randint(0, classes, (batch,), generator=g).to(rt.device))

        def next_batch():
            return fixed

    def step():
        views_, labels_ = next_batch()
        return stepper(views_, labels_, epoch)

    return Subject(cfg.method, step)


def timed(subject: Subject, n: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(n):
        runtime.synchronize(device)
        t0 = time.perf_counter()
        subject.step()
        runtime.synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


def profile_steps(subject: Subject, steps: int, device: torch.device):
    """(counts per step, the profiler) over `steps` steps: aten operator calls (nested ones
    included) and, on CUDA, kernels launched and their time."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        for _ in range(steps):
            subject.step()
        runtime.synchronize(device)
    events = prof.events()
    counts = {"ops_per_step": sum(e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::")
                                  for e in events) / steps}
    if on_gpu:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        counts["kernels_per_step"] = len(kernels) / steps
        counts["kernel_ms_per_step"] = sum(e.device_time for e in kernels) / 1e3 / steps
    return counts, prof


PROFILED_STEPS = 3


def run_bench(method: str, model: str, num_classes: int, batch_size: int, peers: int, device: str,
              precision: str, compile: bool, end_to_end: bool, threads: Optional[int], warmup: int,
              iters: int, rounds: int, overrides: list[str], profile: bool = False) -> dict[str, Any]:
    rt = runtime.setup(device, precision, None, threads)
    common = {"model": model, "batch_size": batch_size, "compile": compile, "precision": precision,
              "device": device, "epochs": 300}
    values = {**common, "method": method, "peers": peers, **parse_overrides(overrides)}
    subject = build_subject(values, rt, num_classes, batch_size, end_to_end)
    base = rss_kib()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    timed(subject, warmup, rt.device)
    per = max(1, iters // rounds)
    times = timed(subject, per, rt.device)
    peak = rss_kib("VmHWM")  # the method's own peak, before the plain network exists
    peak_gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if rt.device.type == "cuda" else None
    plain = build_subject({**common, "method": "independent", "peers": 1}, rt, num_classes, batch_size,
                          end_to_end)
    timed(plain, warmup, rt.device)
    plain_times = timed(plain, per, rt.device)
    for _ in range(rounds - 1):
        times += timed(subject, per, rt.device)
        plain_times += timed(plain, per, rt.device)
    img_s = batch_size / statistics.median(times)
    plain_img_s = batch_size / statistics.median(plain_times)
    result = {"method": method, "model": model, "num_classes": num_classes, "batch_size": batch_size,
              "peers": peers, "device": str(rt.device), "precision": str(rt.dtype).replace("torch.", ""),
              "compile": compile, "end_to_end": end_to_end, "threads": torch.get_num_threads(),
              "channels_last": rt.channels_last, "steps_timed": len(times),
              "step_ms": 1e3 * statistics.median(times), "plain_step_ms": 1e3 * statistics.median(plain_times),
              "img_per_s": img_s, "plain_img_per_s": plain_img_s, "ratio_to_plain": img_s / plain_img_s,
              "rss_before_mib": base / 1024, "peak_rss_mib": peak / 1024, "torch": torch.__version__}
    if peak_gpu is not None:
        result["peak_gpu_mib"] = peak_gpu
    if profile:
        for prefix, s in (("", subject), ("plain_", plain)):
            result.update({prefix + k: v for k, v in profile_steps(s, PROFILED_STEPS, rt.device)[0].items()})
    return result


def run_processes(argv: list[str], processes: int) -> dict[str, Any]:
    """The throughput preset: `processes` copies of the same benchmark at once (several runs sharing
    one GPU, or the cores of a CPU); img/s are summed over the copies."""
    cmd = [sys.executable, "-m", "dkel", "bench", *argv, "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(processes)]
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise DkelError(f"a benchmark process failed: {(err.strip().splitlines() or ['?'])[-1]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    total = {k: sum(r[k] for r in results) for k in ("img_per_s", "plain_img_per_s")}
    return {**results[0], **total, "ratio_to_plain": total["img_per_s"] / total["plain_img_per_s"],
            "processes": processes, "img_per_s_per_process": [r["img_per_s"] for r in results],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in results)}


def print_result(r: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(r))
        return
    procs = f", {r['processes']} processes at once" if "processes" in r else ""
    print(f"| {r['method']} {r['model']} ({r['num_classes']} classes, batch {r['batch_size']}, {r['peers']} peers, "
          f"{r['precision']}{', compiled' if r['compile'] else ''}{', end-to-end' if r['end_to_end'] else ''}, "
          f"{r['device']}, {r['threads']} threads{procs}) | img/s | ms/step |\n|---|---|---|\n"
          f"| {r['method']} step | {r['img_per_s']:.1f} | {r['step_ms']:.1f} |\n"
          f"| plain single {r['model']} step | {r['plain_img_per_s']:.1f} | {r['plain_step_ms']:.1f} |\n"
          f"| ratio to plain | {r['ratio_to_plain']:.3f} | |\n"
          f"| peak RSS (MiB) | {r['peak_rss_mib']:.0f} | |"
          + (f"\n| peak GPU memory (MiB) | {r['peak_gpu_mib']:.0f} | |" if "peak_gpu_mib" in r else "")
          + "".join(f"\n| {label} per step (plain) | {r[key]:.0f} ({r['plain_' + key]:.0f}) | |"
                    for key, label in (("ops_per_step", "aten operator calls"), ("kernels_per_step", "CUDA kernels"))
                    if key in r), file=sys.stdout)
