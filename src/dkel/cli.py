"""`dkel` command line: train, eval, export, list (and the study tools)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

from . import __version__
from .errors import ConfigError, DkelError, Terminated, TrainingStopped

# flags that set a config key of the same name (method-specific ones are checked against the method)
TRAIN_FLAGS = {
    "method": (str, "method to train (see `dkel list`)"),
    "model": (str, "backbone: a zoo name (see `dkel list`), torchvision:NAME, timm:NAME or module:attribute; "
                   "whole-network methods also take model=[a,b,...], one per peer"),
    "dataset": (str, "dataset (see `dkel list`)"),
    "data_dir": (str, "folder holding the dataset (default: data/<dataset>)"),
    "epochs": (int, "training epochs"),
    "batch_size": (int, "global batch size"),
    "lr": (float, "initial learning rate"),
    "seed": (int, "random seed"),
    "peers": (int, "number of peers K"),
    "train_subset": (int, "train on a fixed class-balanced subset of N images"),
    "out": (str, "exact run folder (default: runs/<dataset>/<method>-<model>/<name>-seed<k>)"),
    "device": (str, "auto, cpu, cuda or cuda:N"),
    "precision": (str, "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16"),
    "threads": (int, "CPU threads (default: torch's choice)"),
    "mode": (str, "DKEL: paper (the SPEC reconstruction of the paper; its formulas were not available) or "
                  "reference (the released code's loss weights, EMA warm-up and teacher initialisation)"),
    "init_steps": (int, "DKEL: teacher initialisation steps k"),
    "decay": (str, "DKEL: ensemble decay exp|cos|linear|none|const"),
    "beta": (float, "DKEL: exponential decay rate per epoch at the paper's length (stretched with time_scale)"),
}


def config_default(key: str) -> Any:
    """The default of config key `key`: the engine's, else that of the first method that has it."""
    import dataclasses

    from .config import TrainConfig
    from .methods import METHODS

    for cls in (TrainConfig, *(e.obj.Config for e in METHODS)):
        for f in dataclasses.fields(cls):
            if f.name == key:
                return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return None


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a method and write a run folder",
                       description="Train a method. Any config field can be set as key=value "
                                   "(e.g. schedule=multistep time_scale=1); unknown keys are errors. "
                                   "Defaults < --config YAML < flags < key=value.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--config", help="YAML config file (e.g. configs/cifar100/dkel_resnet32.yaml)")
    for key, (typ, help_text) in TRAIN_FLAGS.items():
        default = config_default(key)
        shown = "" if default is None or "default" in help_text else f" (default: {default})"
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, help=help_text + shown)
    p.add_argument("--download", action="store_const", const=True, help="download the dataset if missing")
    p.add_argument("--no-teacher-init", dest="teacher_init", action="store_const", const=False,
                   help="DKEL: skip the teacher initialisation (teacher_init=false)")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the whole training step")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue an interrupted run exactly (it may extend epochs or change execution keys)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run folder that dkel created (never anything else)")


def train_config(args) -> Any:
    from .config import load_yaml
    from .methods import method_configs
    from .run import resolve_run

    flags = {k: v for k, v in vars(args).items()
             if v is not None and (k in TRAIN_FLAGS or k in ("download", "teacher_init", "compile"))}
    layers: list[tuple[str, dict]] = []
    if args.resume:
        from .run_folder import RunFolder

        layers.append((f"{args.resume}/config.yaml", RunFolder(args.resume).require_run().effective_config()))
    if args.config:
        layers.append((args.config, load_yaml(args.config)))
    from .config import parse_overrides

    layers += [("command-line flags", flags), ("overrides", parse_overrides(args.overrides))]
    method = next((v["method"] for _, v in reversed(layers) if v.get("method")), None) or config_default("method")
    configs = method_configs()
    if method in configs:
        check_method_flags(flags, method, configs)
    return resolve_run(layers, args.imports or [])


def check_method_flags(flags: dict[str, Any], method: str, configs: dict[str, type]) -> None:
    """A method-specific flag given to a method without that setting names the methods that have it."""
    import dataclasses

    from .config import TrainConfig, field_names

    own = set(field_names(TrainConfig)) | set(field_names(configs[method]))
    for key in flags:
        if key not in own:
            owners = [m for m, cls in configs.items() if key in {f.name for f in dataclasses.fields(cls)}]
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} is a setting of {', '.join(owners) or 'no method'}; method {method} "
                              "does not have it")


def cmd_train(args) -> None:
    from .engine import train

    cfg = train_config(args)
    train(cfg, resume=args.resume, overwrite=args.overwrite)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run's checkpoint on the test split",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", choices=("last", "best"), default="last")
    p.add_argument("--device", default="auto")


def cmd_eval(args) -> None:
    from .engine import TOP5, evaluate_run

    acc, deploy = evaluate_run(args.run_dir, args.checkpoint, args.device)
    print("| output | top-1 | top-5 |\n|---|---|---|")
    for name, value in acc.items():
        if name.endswith(TOP5):
            continue
        mark = " (deploy_acc)" if name == deploy else ""
        top5 = acc.get(name + TOP5)
        print(f"| {name}{mark} | {value * 100:.2f} | {'' if top5 is None else f'{top5 * 100:.2f}'} |")


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export the deployed single network")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--format", choices=("torchscript", "onnx", "safetensors"), default="safetensors")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last")
    p.add_argument("--out", type=Path, help="output file, or a folder to write deploy.<ext> into "
                                            "(default: RUN_DIR/export/deploy.<ext>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")


def cmd_export(args) -> None:
    from .export import export_run

    path, diff = export_run(args.run_dir, args.format, args.checkpoint, args.out, args.overwrite)
    print(f"wrote {path} (max |difference| to the in-memory network: {diff:.2e})")


def add_list(sub) -> None:
    sub.add_parser("list", help="list methods, models and datasets")


def cmd_list(args) -> None:
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    print("## Methods\n\n| method | what it does | from |\n|---|---|---|")
    for e in METHODS:
        print(f"| {e.name} | {e.description} | {e.obj.paper} |")
    print("\n## Switches to the authors' code (defaults follow SPEC; see docs/methods.md)\n\n"
          "| method | setting: effect |\n|---|---|")
    for e in METHODS:
        for switch in e.obj.authors_switches:
            print(f"| {e.name} | {switch} |")
    print("\n## Models\n\n| model | input | description |\n|---|---|---|")
    for e in MODELS:
        print(f"| {e.name} | {e.obj.input_size}x{e.obj.input_size} | {e.description} |")
    print("\nAlso any torchvision classifier as torchvision:NAME, any timm model as timm:NAME (pip install "
          "'dkel[timm]') and your own network as module:attribute (a callable num_classes -> nn.Module); branched "
          "methods split it where its last stage starts, or at split=MODULE.")
    print("\n## Datasets\n\n| dataset | paper_epochs (time_scale=auto) | description |\n|---|---|---|")
    for e in DATASETS:
        print(f"| {e.name} | {e.obj.paper_epochs or '— (not scaled unless set)'} | {e.description} |")


def add_simulate(sub) -> None:
    from . import simulate

    p = sub.add_parser("simulate", help="the paper's 2D Monte Carlo simulation (SPEC section 5)",
                       description="Points in the plane stand for distributions; compares PCL, DK and DKEL "
                                   "variants on paired random trials. See docs/simulation.md.")
    simulate.add_arguments(p)
    p.add_argument("--out", type=Path, default=Path("runs/simulation"),
                   help="folder for simulation.csv and simulation.png (default: runs/simulation)")
    p.add_argument("--trajectory", action="store_true", help="also draw one trial in the plane (trajectory.png)")


def cmd_simulate(args) -> None:
    from . import simulate

    cfg = simulate.config_from_args(args)
    gaps, written = simulate.run(cfg, args.out, args.trajectory)
    print(simulate.summary_markdown(gaps, cfg))
    print("\nwrote " + ", ".join(str(p) for p in written))


def add_compare(sub) -> None:
    from . import compare

    compare.add_compare_arguments(sub.add_parser(
        "compare", help="train a grid of methods x models x datasets x seeds (x sweeps) and tabulate it",
        description=compare.COMPARE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))


def cmd_compare(args) -> None:
    from . import compare

    compare.compare_command(args)


def add_table(sub) -> None:
    from . import compare

    compare.add_table_arguments(sub.add_parser(
        "table", help="tabulate existing run folders (mean ± std over seeds)",
        description="Aggregate run folders (or folders searched recursively for results.json) into the "
                    "table `dkel compare` writes, optionally beside the published numbers (SPEC 6.1)."))


def cmd_table(args) -> None:
    from . import compare

    compare.table_command(args)


def add_schedules(sub) -> None:
    p = sub.add_parser("schedules", help="plot DKEL's weight schedules (ramp-up, ensemble decays)",
                       description="The weights of DKEL's loss per step of a run of --epochs epochs, with the "
                                   "paper's constants scaled by epochs / paper-epochs as time_scale=auto does.")
    p.add_argument("--out", type=Path, default=Path("docs/schedules.png"), help="PNG file (default: docs/schedules.png)")
    p.add_argument("--epochs", type=int, default=300, help="the run's epochs (default: 300, the CIFAR recipe)")
    p.add_argument("--paper-epochs", type=int, default=300, help="the paper's length (default: 300)")
    p.add_argument("--beta", type=float, default=0.5, help="exponential decay rate per paper epoch (default: 0.5)")
    p.add_argument("--decay-horizon", type=float, default=10.0,
                   help="cos/linear decay horizon in paper epochs (default: 10)")
    p.add_argument("--rampup-length", type=float, default=80.0, help="ramp-up length in paper epochs (default: 80)")


def cmd_schedules(args) -> None:
    from .schedules import plot_schedules

    for name in ("epochs", "paper_epochs"):
        if getattr(args, name) < 1:
            raise DkelError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    plot_schedules(args.out, args.epochs, args.beta, args.decay_horizon, args.rampup_length, args.paper_epochs)
    print(f"wrote {args.out}")


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="training throughput of a method against a plain network",
                       description="Times full training steps (forward, losses, backward, optimizer, EMA) of a "
                                   "method and of a plain single network of the same model, interleaved, in "
                                   "one process. One sample is one image with its K views.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="method settings, e.g. mode=reference")
    p.add_argument("--method", default="dkel")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--compile", action="store_true", help="torch.compile the whole training step")
    p.add_argument("--end-to-end", action="store_true", help="include the on-device data pipeline")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=12, help="timed steps of each network")
    p.add_argument("--rounds", type=int, default=4, help="interleaving rounds")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--profile", action="store_true",
                   help="also count aten operator calls per step (and CUDA kernels on a GPU) with torch.profiler")
    p.add_argument("--processes", type=int, default=1,
                   help="throughput preset: run this many copies at once and sum their img/s "
                        "(several runs sharing one GPU)")


def cmd_bench(args) -> None:
    from .bench import print_result, run_bench, run_processes

    for name, low in (("warmup", 0), ("iters", 1), ("rounds", 1), ("processes", 1), ("batch_size", 2)):
        if getattr(args, name) < low:
            raise DkelError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.iters < args.rounds:
        raise DkelError(f"--iters ({args.iters}) must be at least --rounds ({args.rounds})")
    if args.processes > 1:  # each copy gets the same arguments, one process each
        copy = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                ("method", "model", "num_classes", "batch_size", "peers", "device", "precision", "warmup", "iters",
                 "rounds")]
        copy += [f"--{flag.replace('_', '-')}" for flag in ("compile", "end_to_end", "profile") if getattr(args, flag)]
        copy += [f"--threads={args.threads}"] if args.threads else []
        print_result(run_processes(copy + args.overrides, args.processes), args.json)
        return
    result = run_bench(args.method, args.model, args.num_classes, args.batch_size, args.peers, args.device,
                       args.precision, args.compile, args.end_to_end, args.threads, args.warmup, args.iters,
                       args.rounds, args.overrides, args.profile)
    print_result(result, args.json)


COMMANDS = {"train": (add_train, cmd_train), "eval": (add_eval, cmd_eval), "export": (add_export, cmd_export),
            "list": (add_list, cmd_list), "bench": (add_bench, cmd_bench), "simulate": (add_simulate, cmd_simulate),
            "compare": (add_compare, cmd_compare), "table": (add_table, cmd_table),
            "schedules": (add_schedules, cmd_schedules)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dkel", description="Online knowledge distillation: DKEL and its baselines.")
    p.add_argument("--version", action="version", version=f"dkel {__version__}")
    sub = p.add_subparsers(dest="command", metavar="command")
    for add, _ in COMMANDS.values():
        add(sub)
    for command in sub.choices.values():
        command.add_argument("--import", dest="imports", action="append", metavar="MODULE_OR_FILE",
                             help="import a plugin (a module or a .py file registering models, datasets or "
                                  "methods) first; repeatable; a run records it for later commands")
    return p


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it is swapped under test capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    """Like parse_args, but key=value overrides may sit anywhere among the flags."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = args.overrides + extra
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse(argv)
    if args.command is None:
        parser().print_help()
        sys.exit(2)
    log = logging.getLogger("dkel")  # our messages only; other libraries keep their own levels
    if not any(isinstance(h, StderrHandler) for h in log.handlers):
        log.addHandler(StderrHandler())
        log.propagate = False
    log.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        from . import plugins

        plugins.activate(args.imports or [])
        COMMANDS[args.command][1](args)
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(3)
    except DkelError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"interrupted{_continue_hint(e)}", file=sys.stderr)
        sys.exit(130)
    except Terminated as e:
        print(f"terminated by SIGTERM{_continue_hint(e)}", file=sys.stderr)
        sys.exit(143)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame) -> None:
    raise Terminated()


def _continue_hint(interruption: BaseException) -> str:
    """How to continue an interrupted training run (the engine names its folder on the exception)."""
    folder = getattr(interruption, "run_folder", None)
    return f"; continue with: dkel train --resume {folder}" if folder else ""
