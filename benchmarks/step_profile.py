"""Where a training step's time goes: aten operator calls, kernels launched and GPU kernel time per step
against the wall time per step, for a method and a plain single network of the same model, with the
operators that take the time (docs/performance.md).  `dkel bench --profile` reports the same counts.

    python benchmarks/step_profile.py --device cuda --method dkel --model resnet32 --batch-size 128 --packed true
"""
import argparse
import time

import yaml

from dkel import runtime
from dkel.bench import build_subject, profile_steps, timed


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
    p.add_argument("--packed", default="auto", help="auto | true | false")
    args = p.parse_args()
    rt = runtime.setup(args.device, "auto", None, None)
    on_gpu = rt.device.type == "cuda"
    for method, peers in ((args.method, args.peers), ("independent", 1)):
        subject = build_subject({"model": args.model, "batch_size": args.batch_size, "compile": args.compile,
                                 "precision": "auto", "device": args.device, "epochs": 300, "method": method,
                                 "peers": peers, "packed": yaml.safe_load(args.packed)},
                                rt, args.num_classes, args.batch_size, False)
        timed(subject, 10, rt.device)  # warm-up (and compilation)
        t0 = time.perf_counter()
        counts, prof = profile_steps(subject, args.steps, rt.device)
        wall_ms = 1e3 * (time.perf_counter() - t0) / args.steps
        print(f"{method}: {wall_ms:.1f} ms/step under the profiler, {counts['ops_per_step']:.0f} aten calls/step "
              f"(nested included)" + (f", {counts['kernels_per_step']:.0f} kernels/step, "
                                      f"{counts['kernel_ms_per_step']:.1f} ms kernel time/step" if on_gpu else ""))
        key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
