"""`dkel compare` (train a grid and tabulate it) and `dkel table` (tabulate existing runs).

Layout.  Every run is an ordinary `dkel train` run folder under the engine's default
layout with `runs_dir=DIR`: DIR/<dataset>/<method>-<model>/<variant>-seed<k>, where the
variant is the run's `name`: the method's mode (or "default") for plain runs, with
`-<key><value>` appended for every swept key the method has (e.g. `paper-beta0.1`).
The same command therefore finds the same folders again: a folder with results.json
is finished and skipped; one with config.yaml but no results.json was interrupted and
is continued with `dkel train --resume`.  A folder whose saved config differs from
the requested one is an error (use another --out or name=), never silently reused.

Method-specific keys.  A key=value (fixed, swept, or from --config) applies to the
methods whose config has that key and is ignored for the others, which run once
instead of once per value (`independent` has no `beta`); a key that no method in the
grid has is an error.  The plan printed first lists what was ignored for whom.

Aggregation (both commands).  One row per (dataset, model, method, variant, epochs):
mean ± sample std (ddof=1) over the finished seeds of the deployed output's accuracy
at the last epoch (primary), the best epoch's, and the other reported outputs;
missing, failed and unfinished runs are listed, not dropped.  Accuracies in %."""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError, DkelError

COMPARE_DESCRIPTION = """\
Train every combination of methods x models x datasets x seeds (x swept keys) as separate
`dkel train` runs under --out, skipping finished runs and resuming interrupted ones, then write
OUT/table.md, OUT/table.csv and OUT/curves.png.

  dkel compare --methods independent,dkel --model resnet8 --dataset digits --seeds 2 --epochs 2
  dkel compare --methods pcl,dkel --model resnet32 --dataset cifar100 --seeds 3 beta=0.05,0.1,0.5 --jobs 3

key=value sets a config key for every run; key=v1,v2,... sweeps it (lists in brackets are single
values). A key applies only to the methods that have it."""

# keys that choose how a run executes, not what it computes: ignored when comparing configs
EXECUTION_KEYS = {"device", "threads", "progress", "compile", "compile_mode", "data_dir", "cache_dir", "download", "tensorboard",
                  "eval_batch_size", "channels_last", "packed"}
GRID_KEYS = {"method", "model", "dataset", "seed", "runs_dir", "out"}
PEER_SUFFIX = re.compile(r"\d+$")


# ----------------------------------------------------------------------------- published numbers
# SPEC section 6.1: CIFAR top-1 (%) as the PCL paper reports them, and DKEL's own results.
# (paper dataset, model, method, value, note); a note marks values not stated as absolute numbers.
PUBLISHED = [
    *[("cifar100", model, method, value, "")
      for model, row in {"resnet32": (73.68, 72.33, 73.79, 73.25, 73.76, 74.14),
                         "resnet110": (77.86, 78.83, 78.40, 78.54, 78.28, 79.98),
                         "vgg16": (75.52, 74.33, 74.37, 74.68, 75.67, 76.89),
                         "densenet40_12": (73.06, 71.45, 71.60, 71.23, 72.52, 73.09),
                         "wrn20_8": (79.77, 79.40, 79.10, 78.83, 79.37, 80.51)}.items()
      for method, value in zip(("dml", "cl", "one", "okddip", "kdcl", "pcl"), row)],
    ("cifar100", "resnet32", "dkel", 74.83, "1 init step"),
    ("cifar10", "resnet32", "pcl", 94.33, ""), ("cifar10", "resnet32", "one", 94.20, ""),
    ("cifar10", "resnet32", "dml", 93.94, ""), ("cifar10", "resnet110", "pcl", 95.53, ""),
    ("cifar10", "vgg16", "pcl", 94.74, ""), ("cifar10", "densenet40_12", "pcl", 94.13, ""),
    ("cifar10", "wrn20_8", "pcl", 95.42, ""),
    ("cifar10", "resnet32", "dkel", 94.56, "1 init step"),
    ("cifar10", "resnet110", "dkel", round(95.53 + 0.16, 2), "PCL + the stated gain 0.16"),
    ("cifar10", "vgg16", "dkel", round(94.74 + 0.61, 2), "PCL + the stated gain 0.61"),
    ("cifar10", "densenet40_12", "dkel", round(94.13 + 0.52, 2), "PCL + the stated gain 0.52"),
]
PAPER_DATASETS = ("cifar10", "cifar100")


def published(dataset: str, model: str, method: str) -> Optional[tuple[float, str]]:
    for d, m, meth, value, note in PUBLISHED:
        if (d, m, meth) == (dataset, model, method):
            return value, note
    return None


# ----------------------------------------------------------------------------- reading runs
@dataclass
class Run:
    folder: Path
    status: str  # done | unfinished | failed | missing
    config: dict[str, Any] = field(default_factory=dict)
    results: Optional[dict[str, Any]] = None
    history: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""
    # what the run is, for grouping (from results.json, else config.yaml, else the plan)
    key: dict[str, Any] = field(default_factory=dict)


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: Optional[str]) -> Any:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def variant_of(folder: Path, config: dict[str, Any]) -> str:
    return config.get("name") or re.sub(r"-seed\d+$", "", folder.name)


def load_run(folder: Path, planned: Optional[dict[str, Any]] = None, failure: str = "") -> Run:
    """The state of a run folder; `planned` (method, model, dataset, seed, variant, epochs) names a
    run that compare expected there, so that a missing one is still reported."""
    import yaml

    folder = Path(folder)
    config: dict[str, Any] = {}
    if (folder / "config.yaml").is_file():
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    results = None
    if (folder / "results.json").is_file():
        try:
            results = json.loads((folder / "results.json").read_text())
        except json.JSONDecodeError as e:
            failure = failure or f"unreadable results.json ({e})"
    history = read_history(folder / "metrics.csv")
    src = results or config
    key = dict(planned or {})
    for k in ("method", "model", "dataset", "seed", "epochs"):
        if k in src:
            key[k] = src[k]
    if config or "variant" not in key:
        key["variant"] = variant_of(folder, config)
    key.setdefault("epochs", None)
    if results is not None and not failure:
        status, note = "done", ""
    elif failure:
        status, note = "failed", failure
    elif config:
        epochs = key.get("epochs")
        status, note = "unfinished", f"stopped after epoch {len(history)}/{epochs}; continue with dkel train --resume"
    else:
        status, note = "missing", "no run folder"
    return Run(folder, status, config, results, history, note, key)


def find_runs(paths: list[Path]) -> list[Run]:
    """Run folders given directly, or found below the given folders (by config.yaml or results.json)."""
    folders: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise DkelError(f"{p} is not a folder")
        if (p / "config.yaml").is_file() or (p / "results.json").is_file():
            found = [p]
        else:
            found = sorted({f.parent for pattern in ("config.yaml", "results.json") for f in p.rglob(pattern)})
        folders += [f for f in found if f not in folders]
    if not folders:
        raise DkelError(f"no run folders (config.yaml or results.json) under {', '.join(map(str, paths))}")
    return [load_run(f) for f in folders]


# ----------------------------------------------------------------------------- aggregation
@dataclass
class Stat:
    values: dict[int, float]  # seed -> value

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> Optional[float]:
        return sum(self.values.values()) / self.n if self.n else None

    @property
    def std(self) -> Optional[float]:
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values.values()) / (self.n - 1))

    def text(self, digits: int = 2) -> str:
        if not self.n:
            return "—"
        if self.std is None:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


GROUP_FIELDS = ("dataset", "model", "method", "variant", "epochs")


@dataclass
class Group:
    key: tuple
    runs: list[Run]

    def __getattr__(self, name: str) -> Any:
        if name in GROUP_FIELDS:
            return self.key[GROUP_FIELDS.index(name)]
        raise AttributeError(name)

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.status == "done"]

    def _joined(self, field_name: str) -> str:
        values = sorted({str(r.results.get(field_name)) for r in self.done if r.results.get(field_name) is not None})
        return ", ".join(values) or "—"

    @property
    def deploy_output(self) -> str:
        return self._joined("deploy_output")

    @property
    def mode(self) -> str:
        return self._joined("mode")

    def stat(self, pick) -> Stat:
        values = {}
        for r in self.done:
            v = pick(r.results)
            if v is not None:
                values[int(r.key.get("seed", len(values)))] = v
        return Stat(values)

    def quantities(self) -> dict[str, Stat]:
        """Primary, best, and every reported non-individual output at the last epoch (in %)."""
        out = {"deploy_last": self.stat(lambda r: 100 * r["deploy_acc"]),
               "deploy_best": self.stat(lambda r: 100 * r["best_deploy_acc"]),
               "best_epoch": self.stat(lambda r: r.get("best_epoch"))}
        for name in self.outputs():
            out[name] = self.stat(lambda r, n=name: 100 * r["metrics"][n] if n in r.get("metrics", {}) else None)
        return out

    def outputs(self) -> list[str]:
        names: list[str] = []
        for r in self.done:
            names += [n for n in r.results.get("metrics", {}) if n not in names and not PEER_SUFFIX.search(n)]
        return sorted(names, key=output_order)

    def configs_differ(self) -> list[str]:
        """Config keys (besides seed, folder and execution) that differ between the group's runs."""
        ignore = EXECUTION_KEYS | {"seed", "out", "runs_dir"}
        configs = [r.config for r in self.runs if r.config]
        keys = sorted({k for c in configs for k in c} - ignore)
        return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def output_order(name: str) -> tuple:
    rank = 0 if name.endswith("_mean") else 1 if "ensemble" in name else 3 if name.endswith("_max") else 2
    return rank, name


def output_label(name: str) -> str:
    if name.endswith("_max"):
        return f"{name} †"
    return name


def group_runs(runs: list[Run]) -> list[Group]:
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(r.key.get(k) for k in GROUP_FIELDS), []).append(r)
    return [Group(k, sorted(v, key=lambda r: (r.key.get("seed") is None, r.key.get("seed") or 0)))
            for k, v in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0]))]


# ----------------------------------------------------------------------------- writing tables
CONVENTION = (
    "Accuracy in %, mean ± sample std (ddof=1) over the finished seeds (n=1: no std). **Primary**: the "
    "deployed output (column *deployed*) at the **last epoch**. *best*: the maximum over epochs of the "
    "deployed output's test accuracy, and *epoch of best* its epoch (the released DKEL code's convention; "
    "optimistic, since the epoch is chosen on the test set). `*_mean`: mean over a group of peers; "
    "`*_ensemble`: an ensemble output; † `*_max`: the best single peer at the last epoch, chosen on the "
    "test set (the released code's convention).")


def markdown(groups: list[Group], title: str, paper: Optional[str] = None) -> str:
    total = sum(len(g.runs) for g in groups)
    done = sum(len(g.done) for g in groups)
    lines = [f"# {title}", "", f"{len(groups)} configurations, {done}/{total} runs finished.", "", CONVENTION, ""]
    head = ["dataset", "model", "method", "variant", "mode", "epochs", "seeds", "deployed",
            "**last epoch (primary)**", "best", "epoch of best"]
    if paper:
        head += [f"paper ({paper})", "last − paper"]
    lines += [_row(head), _row(["---"] * len(head))]
    notes: list[str] = []
    for g in groups:
        q = g.quantities()
        cells = [g.dataset, g.model, g.method, g.variant, g.mode, _fmt(g.epochs), f"{len(g.done)}/{len(g.runs)}",
                 g.deploy_output, q["deploy_last"].text(), q["deploy_best"].text(), q["best_epoch"].text(1)]
        if paper:
            ref = published(paper, g.model, g.method)
            if ref is None:
                cells += ["—", "—"]
            else:
                mark = ""
                if ref[1]:
                    notes.append(ref[1])
                    mark = " " + "*" * len(notes)
                last = q["deploy_last"].mean
                cells += [f"{ref[0]:.2f}{mark}", "—" if last is None else f"{last - ref[0]:+.2f}"]
        lines.append(_row(cells))
    if paper:
        lines += ["", f"Published numbers: SPEC section 6.1 ({paper}; the PCL paper's table for the baselines, "
                      "DKEL's paper for dkel)." + "".join(f" {'*' * (i + 1)} {n}." for i, n in enumerate(notes))]
    outputs = []
    for g in groups:
        outputs += [n for n in g.outputs() if n not in outputs]
    outputs.sort(key=output_order)
    if outputs:
        lines += ["", "## Other outputs at the last epoch", "",
                  _row(["dataset", "model", "method", "variant", *map(output_label, outputs)]),
                  _row(["---"] * (4 + len(outputs)))]
        for g in groups:
            q = g.quantities()
            lines.append(_row([g.dataset, g.model, g.method, g.variant,
                               *(q[o].text() if o in q else "—" for o in outputs)]))
    problems = [(g, r) for g in groups for r in g.runs if r.status != "done"]
    if problems:
        lines += ["", "## Missing, failed or unfinished runs (not in the means above)", "",
                  _row(["dataset", "model", "method", "variant", "seed", "status", "folder", "note"]),
                  _row(["---"] * 8)]
        for g, r in problems:
            lines.append(_row([g.dataset, g.model, g.method, g.variant, _fmt(r.key.get("seed")), r.status,
                               str(r.folder), r.note]))
    differ = [(g, g.configs_differ()) for g in groups]
    differ = [(g, keys) for g, keys in differ if keys]
    if differ:
        lines += ["", "## Warning: configurations differ within a row", ""]
        lines += [f"- {g.method}/{g.variant} on {g.dataset}/{g.model}: {', '.join(keys)}" for g, keys in differ]
    consts = [(g, r.results.get("time_constants")) for g in groups for r in g.done[:1]]
    consts = [(g, c) for g, c in consts if c]
    if consts:
        lines += ["", "## Time constants used (scaled to the run length; first finished seed)", ""]
        lines += [f"- {g.method}/{g.variant} on {g.dataset}/{g.model}, {_fmt(g.epochs)} epochs: "
                  + ", ".join(f"{k} {_fmt(v)}" for k, v in c.items()) for g, c in consts]
    return "\n".join(lines) + "\n"


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{int(value)}" if value.is_integer() else f"{value:.4g}"
    return str(value)


def write_csv(groups: list[Group], path: Path) -> None:
    """Long format: one row per (configuration, quantity); accuracies in %."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*GROUP_FIELDS, "mode", "deploy_output", "quantity", "mean", "std", "n", "runs", "values"])
        for g in groups:
            for name, s in g.quantities().items():
                values = ";".join(f"seed{k}:{v:.4f}" for k, v in sorted(s.values.items()))
                writer.writerow([*(_fmt(x) if x is not None else "" for x in g.key), g.mode, g.deploy_output, name,
                                 "" if s.mean is None else f"{s.mean:.4f}", "" if s.std is None else f"{s.std:.4f}",
                                 s.n, len(g.runs), values])


def plot_curves(groups: list[Group], path: Path) -> bool:
    """Deployed accuracy per epoch: one line per configuration (mean over seeds), band = min–max."""
    panels: dict[tuple, list[Group]] = {}
    for g in groups:
        if any(r.history for r in g.runs):
            panels.setdefault((g.dataset, g.model), []).append(g)
    if not panels:
        return False
    from matplotlib.ticker import MaxNLocator

    from .plots import plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, ((dataset, model), members) in zip(axes[0], panels.items()):
        for g in members:
            by_epoch: dict[int, list[float]] = {}
            for r in g.runs:
                for row in r.history:
                    if row.get("deploy_acc") is not None and row.get("epoch") is not None:
                        by_epoch.setdefault(int(row["epoch"]), []).append(100 * row["deploy_acc"])
            epochs = sorted(by_epoch)
            mean = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
            n = len(g.done)
            line, = ax.plot(epochs, mean, marker="o" if len(epochs) < 15 else None, markersize=3,
                            label=f"{g.method}/{g.variant} ({g.deploy_output}, n={n})")
            ax.fill_between(epochs, [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(title=f"{dataset} / {model}", xlabel="epoch", ylabel="test top-1 of the deployed output (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("mean over seeds, band = min–max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(groups: list[Group], out: Path, title: str, paper: Optional[str] = None,
                  curves: bool = True) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(groups, title, paper)
    (out / "table.md").write_text(text)
    write_csv(groups, out / "table.csv")
    if curves:
        plot_curves(groups, out / "curves.png")
    return text


# ----------------------------------------------------------------------------- the grid
def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: `0.1,0.5` -> 2 values, `[150,225]` -> 1."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return parts + [cur]


def parse_grid_overrides(items: list[str]) -> tuple[dict[str, Any], dict[str, list[tuple[str, Any]]]]:
    """key=value items -> (fixed values, swept keys -> [(token, value)])."""
    from .config import parse_overrides

    fixed: dict[str, Any] = {}
    sweeps: dict[str, list[tuple[str, Any]]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value")
        key = key.strip()
        if key in GRID_KEYS:
            raise ConfigError(f"{key} is set by the grid; use --methods/--models/--datasets/--seeds/--out")
        tokens = [t.strip() for t in split_top_level(value)]
        if len(tokens) == 1:
            fixed.update(parse_overrides([f"{key}={value}"]))
        else:
            if any(not t for t in tokens):
                raise ConfigError(f"sweep {item!r} has an empty value")
            sweeps[key] = [(t, parse_overrides([f"{key}={t}"])[key]) for t in tokens]
    return fixed, sweeps


@dataclass
class Planned:
    key: dict[str, Any]  # method, model, dataset, seed, variant, epochs
    values: dict[str, Any]  # the config keys given to `dkel train` (besides the file's defaults)
    folder: Path
    ignored: list[str]
    resolved: dict[str, Any] = field(default_factory=dict)  # the full config `dkel train` will save
    action: str = "train"  # train | resume | skip
    failure: str = ""

    def label(self) -> str:
        k = self.key
        return f"{k['method']}/{k['variant']} {k['model']} {k['dataset']} seed{k['seed']}"


def _slug(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", token).strip("_")


def plan(methods: list[str], models: list[str], datasets: list[str], seeds: list[int], fixed: dict[str, Any],
         sweeps: dict[str, list[tuple[str, Any]]], out: Path, file_values: Optional[dict[str, Any]] = None,
         execution: Optional[dict[str, Any]] = None) -> list[Planned]:
    """Every run of the grid, with its validated config and run folder (deduplicated)."""
    from .config import field_names, resolve, run_config_class, to_dict
    from .engine import RunFolder
    from .methods import method_configs

    configs = method_configs()
    for m in methods:
        if m not in configs:
            from .registry import unknown_name_message

            raise ConfigError(unknown_name_message("method", m, list(configs)))
    file_values = {k: v for k, v in (file_values or {}).items() if k not in GRID_KEYS}
    valid = {m: set(field_names(run_config_class(configs[m]))) for m in methods}
    for key in [*file_values, *fixed, *sweeps]:
        if not any(key in v for v in valid.values()):
            raise ConfigError(f"no method among {', '.join(methods)} has a config key {key!r}")
    planned: dict[Path, Planned] = {}
    for method in methods:
        keys = valid[method]
        mine = {k: v for k, v in sweeps.items() if k in keys}
        ignored = sorted(k for k in [*file_values, *fixed, *sweeps] if k not in keys)
        base = {k: v for k, v in {**file_values, **fixed, **(execution or {})}.items() if k in keys}
        for combo in itertools.product(*mine.values()) if mine else [()]:
            swept = {k: value for k, (_, value) in zip(mine, combo)}
            for model, dataset, seed in itertools.product(models, datasets, seeds):
                values = {**base, **swept, "method": method, "model": model, "dataset": dataset, "seed": seed,
                          "runs_dir": str(out)}
                values.setdefault("progress", "none")
                cfg = resolve([("the compare command", values)], configs)
                stem = values.get("name") or getattr(cfg, "mode", None) or "default"
                suffix = "".join(f"-{k}{_slug(tok)}" for k, (tok, _) in zip(mine, combo) if k not in ("mode", "name"))
                values["name"] = cfg.name = stem + suffix
                folder = RunFolder.for_config(cfg, cfg.name).root
                key = {"method": method, "model": model, "dataset": dataset, "seed": seed, "variant": cfg.name,
                       "epochs": cfg.epochs}
                planned.setdefault(folder, Planned(key, values, folder, ignored, to_dict(cfg)))
    for p in planned.values():
        p.action = existing_action(p)
    return list(planned.values())


def existing_action(p: Planned) -> str:
    """skip (finished), resume (interrupted), or train (new); an existing folder must match the request."""
    import yaml

    cfg_file, results = p.folder / "config.yaml", p.folder / "results.json"
    if not cfg_file.is_file():
        if p.folder.exists() and any(p.folder.iterdir()):
            raise DkelError(f"{p.folder} exists but is not a run folder (no config.yaml); move it away")
        return "train"
    saved = yaml.safe_load(cfg_file.read_text()) or {}
    if saved.get("name") is None:  # a plain `dkel train` run: its name was the folder's default
        saved["name"] = variant_of(p.folder, saved)
    wanted = p.resolved
    diff = [k for k in wanted if k in saved and k not in EXECUTION_KEYS | {"runs_dir"} and saved[k] != wanted[k]]
    if diff:
        shown = ", ".join(f"{k}: saved {saved[k]!r}, requested {wanted[k]!r}" for k in diff[:4])
        raise DkelError(f"run folder {p.folder} holds a different configuration ({shown}); "
                        f"use another --out or name=")
    return "skip" if results.is_file() else "resume"


def _value_text(value: Any) -> str:
    """A value as `dkel train` parses it back (YAML); plain strings stay unquoted."""
    import yaml

    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def train_command(p: Planned) -> list[str]:
    if p.action == "resume":
        return [sys.executable, "-m", "dkel", "train", "--resume", str(p.folder)]
    return [sys.executable, "-m", "dkel", "train", *(f"{k}={_value_text(v)}" for k, v in p.values.items())]


def execute(runs: list[Planned], jobs: int, logs: Path) -> None:
    """Run the `train`/`resume` entries as `python -m dkel train` subprocesses, `jobs` at a time."""
    todo = [p for p in runs if p.action != "skip"]
    if not todo:
        return
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])  # the folder holding the dkel package
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    lock = threading.Lock()
    counter = itertools.count(1)

    def one(p: Planned) -> None:
        log = logs / (re.sub(r"[^A-Za-z0-9._+-]+", "_", str(p.folder.relative_to(logs.parent))) + ".log")
        t0 = time.perf_counter()
        with lock:
            print(f"start  {p.label()} ({p.action}) -> {p.folder}", flush=True)
        with open(log, "a") as f:
            f.write(f"$ {' '.join(train_command(p))}\n")
            f.flush()
            rc = subprocess.run(train_command(p), stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        with lock:
            n = next(counter)
            if rc == 0:
                print(f"[{n}/{len(todo)}] done   {p.label()} in {time.perf_counter() - t0:.0f}s", flush=True)
            else:
                p.failure = f"exit {rc}: {tail[0][:200]} (log: {log})"
                print(f"[{n}/{len(todo)}] FAILED {p.label()}: {p.failure}", flush=True)

    if jobs <= 1:
        for p in todo:
            one(p)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(one, todo))


# ----------------------------------------------------------------------------- commands
def _names(values: Optional[list[str]], default: Optional[str], what: str) -> list[str]:
    names = [n.strip() for v in (values or []) for n in v.split(",") if n.strip()]
    if not names and default:
        names = [default]
    if not names:
        raise ConfigError(f"no {what} given")
    return list(dict.fromkeys(names))


def add_compare_arguments(p) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value[,value...]",
                   help="config keys for every run; comma-separated values sweep the key")
    p.add_argument("--methods", "--method", dest="methods", action="append",
                   help="comma-separated methods (see `dkel list`)")
    p.add_argument("--models", "--model", dest="models", action="append", help="comma-separated models")
    p.add_argument("--datasets", "--dataset", dest="datasets", action="append", help="comma-separated datasets")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    p.add_argument("--epochs", type=int, help="training epochs (same as epochs=N)")
    p.add_argument("--config", type=Path, help="YAML config file applied to every run (keys a method lacks are "
                                               "ignored for it)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="runs_dir and table folder "
                                                                           "(default: runs/compare)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (default: 1)")
    p.add_argument("--threads", type=int, help="CPU threads per run (default with --jobs N: cores / N)")
    p.add_argument("--paper", choices=PAPER_DATASETS, help="add the published numbers (SPEC 6.1) to the table")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")


def compare_command(args) -> None:
    from .config import TrainConfig, load_yaml

    file_values = load_yaml(args.config) if args.config else {}
    methods = _names(args.methods, file_values.get("method"), "--methods")
    models = _names(args.models, file_values.get("model") or TrainConfig.model, "--models")
    datasets = _names(args.datasets, file_values.get("dataset") or TrainConfig.dataset, "--datasets")
    if args.seeds < 1 or args.jobs < 1:
        raise ConfigError("--seeds and --jobs must be >= 1")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    fixed, sweeps = parse_grid_overrides(args.overrides)
    if args.epochs is not None:
        fixed["epochs"] = args.epochs
    execution: dict[str, Any] = {}
    threads = args.threads or (max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None)
    if threads and "threads" not in fixed:
        execution["threads"] = threads
    runs = plan(methods, models, datasets, seeds, fixed, sweeps, args.out, file_values, execution)
    counts = {a: sum(p.action == a for p in runs) for a in ("skip", "resume", "train")}
    print(f"plan: {len(runs)} runs under {args.out}: {counts['skip']} finished (skipped), "
          f"{counts['resume']} to resume, {counts['train']} to train; {args.jobs} at a time"
          + (f", threads={threads} each" if threads else ""))
    for method in methods:
        ignored = next((p.ignored for p in runs if p.key["method"] == method and p.ignored), None)
        if ignored:
            print(f"note: {method} has no {', '.join(dict.fromkeys(ignored))}; ignored for it (one run per seed)")
    for p in runs:
        if p.action == "skip":
            print(f"skipped {p.label()}: finished ({p.folder / 'results.json'})")
    if args.dry_run:
        for p in runs:
            if p.action != "skip":
                print(" ".join(train_command(p)))
        return
    execute(runs, args.jobs, args.out / "logs")
    loaded = [load_run(p.folder, p.key, p.failure) for p in runs]
    text = write_outputs(group_runs(loaded), args.out, "Comparison", args.paper)
    print()
    print(text)
    print(f"wrote {args.out / 'table.md'}, {args.out / 'table.csv'}, {args.out / 'curves.png'}")
    failed = [p for p in runs if p.failure]
    if failed:
        raise DkelError(f"{len(failed)} of {len(runs)} runs failed; see the table and {args.out / 'logs'}")


def add_table_arguments(p) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run folders, or folders to search recursively for run folders")
    p.add_argument("--paper", choices=PAPER_DATASETS, help="add the published numbers (SPEC 6.1)")
    p.add_argument("--out", type=Path, help="also write table.md, table.csv and curves.png to this folder")


def table_command(args) -> None:
    groups = group_runs(find_runs(args.run_dirs))
    if args.out:
        text = write_outputs(groups, args.out, "Runs", args.paper)
        print(text)
        print(f"wrote {args.out / 'table.md'}, {args.out / 'table.csv'}, {args.out / 'curves.png'}")
    else:
        print(markdown(groups, "Runs", args.paper))
