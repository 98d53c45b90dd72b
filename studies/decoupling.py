#!/usr/bin/env python3
"""The decoupling study (configs/studies/decoupling.yaml): train it, then tabulate it.

    python studies/decoupling.py run --base configs/studies/cifar10_resnet8_decoupling.yaml \
        --seeds 8 --jobs 2 --out runs/decoupling [--variants a,b] [--dry-run] [key=value ...]
    python studies/decoupling.py analyze runs/decoupling --out docs/study-decoupling

`run` trains every variant with one `dkel compare` per variant (name=<variant>, so the run
folders are OUT/<dataset>/<method>-<model>/<variant>-seed<k>); running it again skips finished
runs and resumes interrupted ones.  `analyze` writes paired.md / paired.csv: per variant the
deployed teacher's and the student peers' last-epoch accuracy, their paired differences to the
baseline variant (same seed: same initial weights and batches) with a 95% t-interval over the
seeds, and how many runs collapsed; plus grad_shares.png (each loss term's share of the gradient
at the student logits per epoch, mean over seeds) and teacher.png (the teacher instruments)."""
from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dkel.compare import Run, find_runs, read_history  # noqa: E402
from dkel.errors import DkelError  # noqa: E402
from dkel.engine import collapsed as engine_collapsed  # noqa: E402

VARIANTS = ROOT / "configs" / "studies" / "decoupling.yaml"
QUANTITIES = (("deploy_acc", "deployed teacher"), ("student_mean", "student peers (mean)"))


def load_variants(path: Path = VARIANTS) -> tuple[str, dict[str, dict[str, Any]]]:
    study = yaml.safe_load(path.read_text())
    return study["baseline"], study["variants"]


def _value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def compare_commands(base: Path, seeds: int, out: Path, jobs: int, extra: list[str],
                     variants: Optional[list[str]] = None, first_seed: int = 0) -> list[list[str]]:
    """One `dkel compare` per variant (all, or those named, in the order named), with the variant's
    keys and name=<variant>."""
    _, defined = load_variants()
    for name in variants or ():
        if name not in defined:
            raise SystemExit(f"error: unknown variant {name!r}; the variants are {', '.join(defined)}")
    commands = []
    for name in variants or defined:
        keys = dict(defined[name])
        method = keys.pop("method")
        commands.append([sys.executable, "-m", "dkel", "compare", "--config", str(base), "--methods", method,
                         "--seeds", str(seeds), "--first-seed", str(first_seed), "--jobs", str(jobs),
                         "--out", str(out), f"name={name}",
                         *(f"{k}={_value(v)}" for k, v in keys.items()), *extra])
    return commands


# ----------------------------------------------------------------------------- statistics
def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean of paired differences over seeds."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def collapsed(run: Run, num_classes: Optional[int]) -> bool:
    """The engine stopped the run for a collapse, or (collapse_check=false) its last epoch meets the
    engine's criterion: logits shrunk to zero at chance accuracy (needs `num_classes`)."""
    log = run.folder / "train.log"
    if log.is_file() and "training collapsed" in log.read_text():
        return True
    return bool(num_classes and run.history and engine_collapsed(run.history[-1], num_classes))


def accuracy(run: Run, quantity: str) -> Optional[float]:
    if run.status != "done":
        return None
    value = run.results["deploy_acc"] if quantity == "deploy_acc" else run.results["metrics"].get(quantity)
    return None if value is None else 100 * value


def by_variant(runs: list[Run]) -> dict[str, dict[int, Run]]:
    out: dict[str, dict[int, Run]] = {}
    for r in runs:
        out.setdefault(r.key["variant"], {})[int(r.key["seed"])] = r
    return out


# One row per run: what the paired table needs, kept as runs.csv beside it, so that a study can
# grow over sessions (and machines) that do not share their run folders.
RECORD_FIELDS = ("variant", "seed", "finished", "collapsed", "deploy_acc", "student_mean", "ema_horizon_steps")


def record(run: Run, num_classes: Optional[int]) -> dict[str, Any]:
    consts = (run.results or {}).get("time_constants", {})
    return {"variant": run.key["variant"], "seed": int(run.key["seed"]), "finished": run.status == "done",
            "collapsed": collapsed(run, num_classes), "deploy_acc": accuracy(run, "deploy_acc"),
            "student_mean": accuracy(run, "student_mean"), "ema_horizon_steps": consts.get("ema_horizon_steps")}


def read_table(path: Path, kind: str, needed: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of a CSV this script wrote, numbers as floats, empty cells as None."""
    if not path.is_file():
        raise SystemExit(f"error: {path} is not a file")
    rows = read_history(path)
    missing = set(needed) - set(rows[0] if rows else ())
    if missing:
        raise SystemExit(f"error: {path} is not a {kind} of this study (it lacks {', '.join(sorted(missing))})")
    return rows


def read_records(path: Path) -> list[dict[str, Any]]:
    return [{**r, "seed": int(r["seed"]), "finished": bool(r["finished"]), "collapsed": bool(r["collapsed"])}
            for r in read_table(path, "runs.csv", RECORD_FIELDS)]


def write_records(records: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, RECORD_FIELDS)
        writer.writeheader()
        for r in sorted(records, key=lambda r: (r["variant"], r["seed"])):
            writer.writerow({**r, "finished": int(r["finished"]), "collapsed": int(r["collapsed"])})


def gather(inputs: list[Path], variants: dict[str, Any], num_classes: Optional[int]) -> tuple[list[dict[str, Any]], list[Run]]:
    """The records of runs.csv files and run folders (a run folder replaces a runs.csv row of the
    same variant and seed), and the runs whose folders are here (for the per-epoch plots)."""
    tables = [p for p in inputs if p.suffix == ".csv"]
    folders = [p for p in inputs if p.suffix != ".csv"]
    runs = [r for r in find_runs(folders) if r.key.get("variant") in variants] if folders else []
    records = {(r["variant"], r["seed"]): r for path in tables for r in read_records(path)}
    records.update({(r.key["variant"], int(r.key["seed"])): record(r, num_classes) for r in runs})
    return list(records.values()), runs


def paired_rows(records: list[dict[str, Any]], baseline: str, order: list[str]) -> list[dict[str, Any]]:
    """One row per variant: means, paired differences to `baseline` with 95% intervals, collapses."""
    groups: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["variant"], {})[r["seed"]] = r
    if baseline not in groups:
        raise SystemExit(f"no runs of the baseline variant {baseline!r} (found: {', '.join(groups)})")
    rows = []
    for variant in [v for v in order if v in groups] + sorted(set(groups) - set(order)):
        seeds = groups[variant]
        row: dict[str, Any] = {"variant": variant, "runs": len(seeds),
                               "finished": sum(r["finished"] for r in seeds.values()),
                               "collapsed": sum(r["collapsed"] for r in seeds.values())}
        for quantity, _ in QUANTITIES:
            mine = {s: r[quantity] for s, r in seeds.items() if r[quantity] is not None}
            row[f"{quantity}_mean"] = sum(mine.values()) / len(mine) if mine else math.nan
            ref = {s: r[quantity] for s, r in groups[baseline].items()}
            pairs = [mine[s] - ref[s] for s in sorted(mine) if ref.get(s) is not None]
            row[f"{quantity}_pairs"] = len(pairs)
            diff = t_interval(pairs) if pairs and variant != baseline else (math.nan,) * 3
            row[f"{quantity}_diff"], row[f"{quantity}_low"], row[f"{quantity}_high"] = diff
        row["ema_horizon_steps"] = next((r["ema_horizon_steps"] for r in seeds.values()
                                         if r["ema_horizon_steps"] is not None), None)
        rows.append(row)
    return rows


def pool(first: list[dict[str, Any]], second: list[dict[str, Any]], baseline: str,
         level: float = 0.95) -> list[dict[str, Any]]:
    """Two paired tables over disjoint seeds as one: each difference's mean and t-interval are
    those of all its pairs together, recovered exactly from each table's n, mean and interval.  The
    baseline row is the first table's (the second may have retrained some of its seeds to pair with)."""
    from scipy import stats

    def moments(row: dict[str, Any], q: str) -> tuple[int, float, float]:
        """(n, sum, sum of squares) of the paired differences behind a row."""
        n, mean = row[f"{q}_pairs"], row[f"{q}_diff"]
        if n == 0 or math.isnan(mean):
            return 0, 0.0, 0.0
        sd = 0.0 if n == 1 else (row[f"{q}_high"] - mean) * math.sqrt(n) / stats.t.ppf(0.5 + level / 2, n - 1)
        return n, n * mean, (n - 1) * sd ** 2 + n * mean ** 2

    def joined(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        row = {k: a[k] + b[k] for k in ("runs", "finished", "collapsed")}
        row["variant"], row["ema_horizon_steps"] = a["variant"], a["ema_horizon_steps"]
        for q, _ in QUANTITIES:
            weights = [r["finished"] if not math.isnan(r[f"{q}_mean"]) else 0 for r in (a, b)]
            row[f"{q}_mean"] = (sum(w * r[f"{q}_mean"] for w, r in zip(weights, (a, b)) if w) / sum(weights)
                                if sum(weights) else math.nan)
            (na, sa, qa), (nb, sb, qb) = moments(a, q), moments(b, q)
            n = na + nb
            row[f"{q}_pairs"] = n
            if n == 0:
                row[f"{q}_diff"] = row[f"{q}_low"] = row[f"{q}_high"] = math.nan
                continue
            mean = (sa + sb) / n
            half = (stats.t.ppf(0.5 + level / 2, n - 1) * math.sqrt(max(qa + qb - n * mean ** 2, 0.0) / (n - 1) / n)
                    if n > 1 else math.nan)
            row[f"{q}_diff"], row[f"{q}_low"], row[f"{q}_high"] = mean, mean - half, mean + half
        return {k: row[k] for k in a}

    seconds = {r["variant"]: r for r in second}
    firsts = {r["variant"] for r in first}
    return ([joined(a, seconds[a["variant"]]) if a["variant"] in seconds and a["variant"] != baseline else a
             for a in first] + [b for b in second if b["variant"] not in firsts])


def read_paired(path: Path) -> list[dict[str, Any]]:
    counts = ("runs", "finished", "collapsed", *(f"{q}_pairs" for q, _ in QUANTITIES))
    return [{**r, **{k: int(r[k]) for k in counts}}
            for r in read_table(path, "paired.csv", ("variant", "ema_horizon_steps", *counts))]


def _num(value: Any, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]], baseline: str) -> str:
    head = ["variant", "runs (finished)", "collapsed", "EMA horizon (steps)"]
    for _, label in QUANTITIES:
        head += [f"{label}, %", f"− {baseline} (paired, 95% CI)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["variant"], f"{row['runs']} ({row['finished']})", str(row["collapsed"]),
                 _num(row["ema_horizon_steps"], 0)]
        for quantity, _ in QUANTITIES:
            diff = row[f"{quantity}_diff"]
            ci = (f"{_num(diff, sign=True)} [{_num(row[f'{quantity}_low'], sign=True)}, "
                  f"{_num(row[f'{quantity}_high'], sign=True)}], n={row[f'{quantity}_pairs']}"
                  if not math.isnan(diff) else "—")
            cells += [_num(row[f"{quantity}_mean"]), ci]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Accuracy at the last epoch in %. Paired differences: variant − {baseline} with the same seed "
                  "(same initial weights and batches), mean and 95% t-interval over the seeds both finished. "
                  "Collapsed: stopped by the engine's collapse check (logits shrunk to zero at chance accuracy)."]
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict[str, Any]], baseline: str, out: Path, stem: str) -> tuple[str, list[Path]]:
    """stem.md and stem.csv in `out`; returns the Markdown and the paths written."""
    text = markdown(rows, baseline)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    write_csv(rows, out / f"{stem}.csv")
    return text, [out / f"{stem}.md", out / f"{stem}.csv"]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def mean_curves(runs: dict[int, Run], prefix: str) -> dict[str, list[tuple[int, float]]]:
    """Column -> [(epoch, mean over seeds)] for the metrics.csv columns starting with `prefix`."""
    sums: dict[str, dict[int, list[float]]] = {}
    for r in runs.values():
        for row in r.history:
            for key, value in row.items():
                if key.startswith(prefix) and value is not None:
                    sums.setdefault(key, {}).setdefault(int(row["epoch"]), []).append(value)
    return {k: sorted((e, sum(v) / len(v)) for e, v in per.items()) for k, per in sums.items()}


def plot_instruments(runs: list[Run], order: list[str], out: Path) -> list[Path]:
    from dkel.plots import plt

    groups = by_variant(runs)
    names = [v for v in order if v in groups] + sorted(set(groups) - set(order))
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    written = []
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, names):
        curves = mean_curves(groups[name], "grad_share_")
        if curves:
            epochs = [e for e, _ in next(iter(curves.values()))]
            ax.stackplot(epochs, *[[v for _, v in c] for c in curves.values()],
                         labels=[k[len("grad_share_"):] for k in curves], alpha=0.85)
        ax.set(title=name, xlabel="epoch", ylim=(0, 1))
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0][0].set_ylabel("share of the gradient norm")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("each loss term's share of the gradient at the student logits (probe batch, mean over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "grad_shares.png", dpi=110)
    plt.close(fig)
    written.append(out / "grad_shares.png")
    keys = ("init_teacher_weight", "probe_agree_student_teacher", "probe_agree_teacher_peers",
            "probe_kl_student_teacher")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name in names:
            curve = mean_curves(groups[name], key).get(key)
            if curve:
                ax.plot([e for e, _ in curve], [v for _, v in curve], label=name)
        ax.set(title=key.replace("probe_", ""), xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("the teacher on the probe batch (mean over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "teacher.png", dpi=110)
    plt.close(fig)
    return written + [out / "teacher.png"]


def analyze(inputs: list[Path], out: Path, num_classes: Optional[int]) -> str:
    baseline, variants = load_variants()
    records, runs = gather(inputs, variants, num_classes)
    text, written = write_table(paired_rows(records, baseline, list(variants)), baseline, out, "paired")
    write_records(records, out / "runs.csv")
    written += [out / "runs.csv", *(plot_instruments(runs, list(variants), out) if runs else [])]
    return text + "\nwrote " + ", ".join(map(str, written))


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every variant (one dkel compare each)")
    run.add_argument("--base", type=Path, required=True, help="base config (configs/studies/*_decoupling.yaml)")
    run.add_argument("--seeds", type=int, default=8)
    run.add_argument("--first-seed", type=int, default=0,
                     help="seeds are first-seed .. first-seed + seeds - 1 (to add seeds to a study)")
    run.add_argument("--jobs", type=int, default=1)
    run.add_argument("--out", type=Path, default=Path("runs/decoupling"))
    run.add_argument("--variants", type=lambda v: v.split(","), default=None,
                     help="comma-separated variants to run, in this order (default: all)")
    run.add_argument("--dry-run", action="store_true", help="print the commands only")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="keys for every run (e.g. epochs=2)")
    ana = sub.add_parser("analyze", help="paired-difference table and instrument plots from the run folders")
    ana.add_argument("inputs", nargs="+", type=Path, metavar="FOLDER|runs.csv",
                     help="run folders (searched recursively) and runs.csv files an earlier analyze wrote")
    ana.add_argument("--out", type=Path, required=True)
    ana.add_argument("--classes", type=int, default=None,
                     help="number of classes: also count finished runs whose last epoch meets the collapse criterion")
    pooled = sub.add_parser("pool", help="two paired.csv over disjoint seeds as one table (pooled.md, pooled.csv)")
    pooled.add_argument("first", type=Path, help="paired.csv whose baseline row is kept")
    pooled.add_argument("second", type=Path, help="paired.csv of other seeds of the same variants")
    pooled.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.command == "run":
        for command in compare_commands(args.base, args.seeds, args.out, args.jobs, args.overrides, args.variants,
                                        args.first_seed):
            print("$ dkel " + " ".join(command[3:]), flush=True)
            if not args.dry_run:
                subprocess.run(command, check=True, cwd=ROOT)
    elif args.command == "pool":
        baseline, _ = load_variants()
        text, written = write_table(pool(read_paired(args.first), read_paired(args.second), baseline), baseline,
                                    args.out, "pooled")
        print(text + "\nwrote " + ", ".join(map(str, written)))
    else:
        print(analyze(args.inputs, args.out, args.classes))


if __name__ == "__main__":
    try:
        main()
    except DkelError as e:  # a missing or empty run folder: one line, not a traceback
        raise SystemExit(f"error: {e}")
