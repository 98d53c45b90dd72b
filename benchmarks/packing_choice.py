"""What `packed=auto` should choose on a device: a method's step packed and unpacked, built in one
process and timed in alternating rounds (so load and clock drift hit both alike); prints the
median of the per-round speed ratios (docs/performance.md, "Packed peers").

    python benchmarks/packing_choice.py --device cpu --threads 2 --rounds 8
    python benchmarks/packing_choice.py --device cuda --rounds 8
"""
import argparse
import statistics

from dkel import runtime
from dkel.bench import build_subject, timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--method", default="dkel")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each variant per round")
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    rt = runtime.setup(args.device, args.precision, None, args.threads)
    subjects = {packed: build_subject({"model": args.model, "batch_size": args.batch_size, "compile": args.compile,
                                       "precision": args.precision, "device": args.device, "epochs": 300,
                                       "method": args.method, "peers": args.peers, "packed": packed},
                                      rt, args.num_classes, args.batch_size, False)
                for packed in (False, True)}
    for subject in subjects.values():
        timed(subject, 3, rt.device)  # warm-up (and compilation)
    medians: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.rounds):
        for packed in ((False, True) if i % 2 == 0 else (True, False)):
            medians[packed].append(statistics.median(timed(subjects[packed], args.steps, rt.device)))
    ratios = [u / p for u, p in zip(medians[False], medians[True])]
    img_s = {k: args.batch_size / statistics.median(v) for k, v in medians.items()}
    print(f"{args.method} {args.model} batch {args.batch_size} on {rt.device} ({rt.dtype}), {args.rounds} rounds: "
          f"unpacked {img_s[False]:.1f} img/s, packed {img_s[True]:.1f} img/s; packed/unpacked speed per round "
          f"median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
