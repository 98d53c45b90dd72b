"""Where a training step's time goes: kernels launched and GPU kernel time per step against the wall
time per step, for a method and a plain single network of the same model (docs/performance.md).

    python benchmarks/step_profile.py --device cuda --method dkel --model resnet32 --batch-size 128
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dkel import runtime
from dkel.bench import build_subject, timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--method", default="dkel")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    rt = runtime.setup(args.device, "auto", None, None)
    on_gpu = rt.device.type == "cuda"
    for method, peers in ((args.method, args.peers), ("independent", 1)):
        subject = build_subject({"model": args.model, "batch_size": args.batch_size, "compile": args.compile,
                                 "precision": "auto", "device": args.device, "epochs": 300, "method": method,
                                 "peers": peers}, rt, args.num_classes, args.batch_size, False)
        timed(subject, 10, rt.device)  # warm-up (and compilation)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                subject.step()
            runtime.synchronize(rt.device)
            wall_ms = 1e3 * (time.perf_counter() - t0) / args.steps
        events = prof.events()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_ms = sum(e.device_time for e in kernels) / 1e3 / args.steps
        ops = sum(e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::")
                  for e in events) / args.steps
        print(f"{method}: {wall_ms:.1f} ms/step under the profiler, {ops:.0f} aten calls/step (nested included)"
              + (f", {len(kernels) / args.steps:.0f} kernels/step, {kernel_ms:.1f} ms kernel time/step" if on_gpu else ""))
        key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
