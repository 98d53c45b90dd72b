"""The paper's 2D geometric experiment and Monte Carlo simulation (SPEC section 5).

Distributions are points in the plane, the ground truth is the origin, the loss
between two distributions is their distance.  A step moves a point along the unit
vector towards each of its targets, scaled by the learning rate, and the vector sum
of those pulls is the step.  Per step, each student peer s_i is pulled

    towards the ground truth (CE)                          weight 1
    towards the student ensemble E = mean_j s_j           weight `ensemble_weight`
    towards the teacher peers                              weight `teacher_weight`, split into
        w(e)     * unit(mean of the teachers - s_i)       (decaying ensemble)
        (1-w(e)) * mean over teachers j of unit(T_j - s_i) (individual decoupled knowledge)

where "the teachers" are the other peers' teachers j != i (`teacher_target=others`,
as in the training loss) or its own teacher T_i (`own`; the ensemble is then the
mean of all K teachers).  All pulls are computed from the positions before the step
(simultaneous update); after the step every teacher follows its student by EMA,
T_i <- a T_i + (1 - a) s_i.  The teacher starts as a copy of the student (PCL) or
after `init_steps` ground-truth-only steps of its own (decoupled knowledge).

Every trial of every variant starts from the same initial points (paired trials).
The reported quantity is the mean over trials of the gap (distance to the ground
truth) of the measured points, per epoch; epoch 0 is the state before training
(after the teacher initialisation)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import files
from .errors import DkelError

INITS = ("disc", "gaussian", "square", "cluster")
TEACHER_TARGETS = ("others", "own")
MEASURES = ("teacher", "student", "teacher1")
CONVERGENCE = ("first", "stay")


@dataclass(frozen=True)
class Variant:
    """One curve: a teacher initialisation (or not) and a decay of the ensemble pull."""

    name: str
    teacher_init: bool
    decay: str  # a losses.decay_weight kind; "none" = no decaying ensemble
    label: str
    ramped_teacher: bool = False  # with `rampup`: PCL ramps its teacher pull, DKEL does not (lambda_dk = 1)


VARIANTS = {v.name: v for v in (
    Variant("pcl", False, "none", "PCL (teacher = copy of student, no ensemble)", ramped_teacher=True),
    Variant("dk", True, "none", "DK (teacher init, no ensemble)"),
    Variant("dkel", True, "exp", "DKEL (teacher init + exp-decaying ensemble)"),
    Variant("dkel_cos", True, "cos", "DKEL, cosine decay"),
    Variant("dkel_linear", True, "linear", "DKEL, linear decay"),
    Variant("el", False, "exp", "ensemble only (no teacher init, exp decay)"),
)}
DEFAULT_VARIANTS = ("pcl", "dk", "dkel", "dkel_cos", "dkel_linear")


@dataclass(frozen=True)
class SimConfig:
    """The protocol; every field is a `dkel simulate` option (SPEC section 5 gives the first eight)."""

    trials: int = 10_000
    epochs: int = 90
    peers: int = 3
    lr: float = 0.1
    ema: float = 0.5  # teacher EMA factor a
    init_steps: int = 1  # teacher initialisation steps (decoupled knowledge)
    seed: int = 0
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    # choices the paper leaves open
    init: str = "disc"  # how the initial student points are drawn around the ground truth
    radius: float = 8.8  # disc radius, gaussian std per axis, square half-width, or cluster spread (disc)
    distance: float = 8.0  # cluster: distance of the cluster centre from the ground truth
    steps_per_epoch: int = 1
    teacher_target: str = "others"  # others (j != i, as in the loss) | own (T_i)
    ensemble_weight: float = 1.0  # weight of the pull towards the student ensemble
    teacher_weight: float = 1.0  # weight of the whole teacher pull (lambda_dk)
    rampup: float = 0.0  # > 0: ramp length (epochs) of r(e) on the ensemble pull and on PCL's teacher pull
    init_lr: Optional[float] = None  # step size of the teacher initialisation (default: lr)
    beta: float = 0.5  # exp decay per epoch
    decay_horizon: float = 10.0  # epochs, for cos and linear decay
    measure: str = "teacher"  # whose gap: teacher (mean over teacher peers, the deployed side) | student | teacher1
    converge_tol: Optional[float] = None  # convergence threshold on the mean gap (default 2 * lr)
    convergence: str = "first"  # first epoch below the threshold | stay: first epoch after which it stays below
    final_window: int = 5  # final gap = mean of the mean gap over the last N epochs

    @property
    def tol(self) -> float:
        return 2 * self.lr if self.converge_tol is None else self.converge_tol

    def check(self) -> None:
        problems = [
            (self.trials >= 1 and self.epochs >= 1, "trials and epochs must be >= 1"),
            (self.peers >= 2, f"peers must be >= 2 (each peer learns from the others), got {self.peers}"),
            (self.lr > 0 and self.steps_per_epoch >= 1, "lr must be > 0 and steps_per_epoch >= 1"),
            (0 <= self.ema <= 1, f"ema must be in [0, 1], got {self.ema}"),
            (self.init_steps >= 0, f"init_steps must be >= 0, got {self.init_steps}"),
            (self.init in INITS, f"init must be one of {', '.join(INITS)}, got {self.init!r}"),
            (self.teacher_target in TEACHER_TARGETS,
             f"teacher_target must be one of {', '.join(TEACHER_TARGETS)}, got {self.teacher_target!r}"),
            (self.measure in MEASURES, f"measure must be one of {', '.join(MEASURES)}, got {self.measure!r}"),
            (self.convergence in CONVERGENCE, f"convergence must be one of {', '.join(CONVERGENCE)}"),
            (1 <= self.final_window <= self.epochs, f"final_window must be in 1..epochs, got {self.final_window}"),
            (self.radius > 0 and self.decay_horizon > 0, "radius and decay_horizon must be > 0"),
        ]
        for ok, msg in problems:
            if not ok:
                raise DkelError(msg)
        for name in self.variants:
            if name not in VARIANTS:
                raise DkelError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")


# ----------------------------------------------------------------------------- the model
def initial_points(cfg: SimConfig) -> np.ndarray:
    """[trials, peers, 2] initial student points around the ground truth at the origin."""
    rng = np.random.default_rng(cfg.seed)
    shape = (cfg.trials, cfg.peers)
    if cfg.init == "disc":  # uniform in the disc: radius ~ R sqrt(U)
        rho = cfg.radius * np.sqrt(rng.random(shape))
        phi = rng.random(shape) * 2 * math.pi
        return np.stack([rho * np.cos(phi), rho * np.sin(phi)], -1)
    if cfg.init == "gaussian":
        return rng.normal(0.0, cfg.radius, shape + (2,))
    if cfg.init == "square":
        return rng.uniform(-cfg.radius, cfg.radius, shape + (2,))
    # cluster: the peers start close together (as freshly initialised networks all predict nearly
    # uniform distributions), uniformly in a disc of radius `radius` around a centre at `distance`
    phi0 = rng.random((cfg.trials, 1)) * 2 * math.pi
    centre = cfg.distance * np.stack([np.cos(phi0), np.sin(phi0)], -1)
    rho = cfg.radius * np.sqrt(rng.random(shape))
    phi = rng.random(shape) * 2 * math.pi
    return centre + np.stack([rho * np.cos(phi), rho * np.sin(phi)], -1)


def unit(v: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis; a zero vector (target reached) pulls nowhere."""
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, n, out=np.zeros_like(v), where=n > 1e-12)


def init_teachers(students: np.ndarray, cfg: SimConfig, variant: Variant) -> np.ndarray:
    """Teacher peers: copies of the students, then `init_steps` ground-truth-only steps."""
    teachers = students.copy()
    if variant.teacher_init:
        lr = cfg.lr if cfg.init_lr is None else cfg.init_lr
        for _ in range(cfg.init_steps):
            teachers = teachers + lr * unit(-teachers)
    return teachers


def teacher_pull(s: np.ndarray, t: np.ndarray, w: float, target: str) -> np.ndarray:
    """[N, K, 2] pull of the teachers on each student peer with ensemble weight w."""
    k = s.shape[1]
    if target == "own":
        individual = unit(t - s)
        mean = t.mean(1, keepdims=True)
    else:
        pulls = unit(t[:, None, :, :] - s[:, :, None, :])  # [N, i, j, 2]: student i towards teacher j
        off = 1.0 - np.eye(k)[None, :, :, None]
        individual = (pulls * off).sum(2) / (k - 1)
        mean = (t.sum(1, keepdims=True) - t) / (k - 1)  # the other teachers' mean, per i
    out = (1.0 - w) * individual
    if w > 0:
        out = out + w * unit(mean - s)
    return out


def pull_weights(epoch: int, cfg: SimConfig, variant: Variant) -> tuple[float, float, float]:
    """(student-ensemble weight, teacher weight, decaying-ensemble share w) at an epoch."""
    from .losses import decay_weight, sigmoid_rampup  # import torch only when simulating

    r = sigmoid_rampup(epoch, cfg.rampup) if cfg.rampup > 0 else 1.0
    teacher = cfg.teacher_weight * (r if variant.ramped_teacher else 1.0)
    return cfg.ensemble_weight * r, teacher, decay_weight(epoch, variant.decay, cfg.beta, cfg.decay_horizon)


def student_step(s: np.ndarray, t: np.ndarray, weights: tuple[float, float, float], cfg: SimConfig) -> np.ndarray:
    ensemble, teacher, w = weights
    pull = unit(-s) + ensemble * unit(s.mean(1, keepdims=True) - s)
    pull = pull + teacher * teacher_pull(s, t, w, cfg.teacher_target)
    return s + cfg.lr * pull


def measured(s: np.ndarray, t: np.ndarray, cfg: SimConfig) -> np.ndarray:
    """[N] gap of each trial: mean distance of the measured points to the ground truth."""
    points = {"teacher": t, "student": s, "teacher1": t[:, :1]}[cfg.measure]
    return np.linalg.norm(points, axis=-1).mean(1)


def run_variant(students: np.ndarray, cfg: SimConfig, variant: Variant,
                keep_path: bool = False) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Simulate all trials of one variant from the given initial points.

    Returns the [epochs + 1, N] gaps per epoch and trial, and with keep_path the
    [epochs + 1, 2, N, K, 2] positions of (students, teachers) at the end of each epoch."""
    s = students.astype(np.float64)
    t = init_teachers(s, cfg, variant)
    gaps = [measured(s, t, cfg)]
    path = [np.stack([s, t])] if keep_path else None
    for epoch in range(cfg.epochs):
        weights = pull_weights(epoch, cfg, variant)
        for _ in range(cfg.steps_per_epoch):
            s = student_step(s, t, weights, cfg)
            t = cfg.ema * t + (1.0 - cfg.ema) * s
        gaps.append(measured(s, t, cfg))
        if keep_path:
            path.append(np.stack([s, t]))
    return np.stack(gaps), (np.stack(path) if keep_path else None)


def simulate(cfg: SimConfig) -> dict[str, np.ndarray]:
    """[epochs + 1, trials] gaps of every variant, all from the same initial points."""
    cfg.check()
    students = initial_points(cfg)
    return {name: run_variant(students, cfg, VARIANTS[name])[0] for name in cfg.variants}


# ----------------------------------------------------------------------------- summary
def convergence_epoch(curve: np.ndarray, cfg: SimConfig) -> Optional[int]:
    """The epoch at which the mean-gap curve counts as converged (None: not within the run)."""
    below = curve < cfg.tol
    if cfg.convergence == "first":
        hits = np.flatnonzero(below)
        return int(hits[0]) if len(hits) else None
    above = np.flatnonzero(~below)
    last = int(above[-1]) + 1 if len(above) else 0
    return last if last < len(curve) else None


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over trials of the trial-by-trial difference a - b."""
    d = a - b
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan


def summary(gaps: dict[str, np.ndarray], cfg: SimConfig) -> list[dict]:
    """Per variant: mean gap at epochs 0 and 10, final gap, convergence epoch, and the paired
    differences (mean, standard error) of the epoch-10 and final gaps to the first variant's."""
    e10 = min(10, cfg.epochs)
    finals = {name: g[-cfg.final_window:].mean(0) for name, g in gaps.items()}  # [trials]
    base = next(iter(gaps))
    rows = []
    for name, g in gaps.items():
        curve = g.mean(1)
        rows.append({"variant": name, "gap_epoch0": float(curve[0]), "gap_epoch10": float(curve[e10]),
                     "final_gap": float(finals[name].mean()), "converged": convergence_epoch(curve, cfg),
                     "vs": base, "epoch10_diff": paired(g[e10], gaps[base][e10]),
                     "final_diff": paired(finals[name], finals[base])})
    return rows


def summary_markdown(gaps: dict[str, np.ndarray], cfg: SimConfig) -> str:
    how = "first epoch" if cfg.convergence == "first" else "first epoch from which it stays"
    rows = summary(gaps, cfg)
    lines = [f"Mean gap of the {cfg.measure} points to the ground truth over {cfg.trials} paired trials "
             f"({cfg.epochs} epochs); final gap = mean over the last {cfg.final_window} epochs; converged = "
             f"{how} with mean gap < {cfg.tol:g}; Δ = difference to {rows[0]['vs']}, trial by trial "
             f"(mean ± standard error).", "",
             "| variant | gap, epoch 0 | gap, epoch 10 | Δ epoch 10 | final gap | Δ final | converged (epoch) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        conv = r["converged"] if r["converged"] is not None else "not within the run"
        same = r["variant"] == r["vs"]
        d10, dfin = ("—", "—") if same else (f"{r['epoch10_diff'][0]:+.4f} ± {r['epoch10_diff'][1]:.4f}",
                                             f"{r['final_diff'][0]:+.4f} ± {r['final_diff'][1]:.4f}")
        lines.append(f"| {r['variant']} | {r['gap_epoch0']:.3f} | {r['gap_epoch10']:.3f} | {d10} | "
                     f"{r['final_gap']:.4f} | {dfin} | {conv} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- output
def write_csv(curves: dict[str, np.ndarray], path: Path) -> None:
    """Column `epoch` and one column of mean gap per variant."""
    names = list(curves)
    files.write_csv(path, [["epoch", *names], *([epoch, *(f"{curves[n][epoch]:.6f}" for n in names)]
                                                for epoch in range(len(next(iter(curves.values())))))])


def plot_curves(curves: dict[str, np.ndarray], cfg: SimConfig, path: Path) -> None:
    """Left: mean gap per epoch (log scale); right: each curve minus the first variant's (paired)."""
    from .plots import plt

    fig, (ax, diff) = plt.subplots(1, 2, figsize=(12, 4.3))
    epochs = np.arange(cfg.epochs + 1)
    base = next(iter(curves))
    for name, curve in curves.items():
        ax.plot(epochs, curve, label=VARIANTS[name].label, linewidth=1.4)
        diff.plot(epochs, curve - curves[base], label=name, linewidth=1.4)
    ax.axhline(cfg.tol, color="grey", linestyle=":", linewidth=1, label=f"convergence threshold {cfg.tol:g}")
    ax.set(yscale="log", xlabel="epoch", ylabel=f"mean gap of the {cfg.measure} points to the ground truth",
           title=f"2D simulation, {cfg.trials} paired trials (teachers: {cfg.teacher_target})")
    diff.set(xlabel="epoch", ylabel=f"mean gap minus {base}'s", title=f"difference to {base} (below 0: closer)")
    for a in (ax, diff):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)


def plot_trajectory(cfg: SimConfig, path: Path, trial: int = 0,
                    variants: tuple[str, ...] = ("pcl", "dkel")) -> None:
    """The 2D picture of one trial: student and teacher peer paths per variant."""
    from .plots import plt

    one = dataclasses.replace(cfg, trials=max(trial + 1, 1))
    students = initial_points(one)[trial:trial + 1]
    fig, axes = plt.subplots(1, len(variants), figsize=(5.2 * len(variants), 5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes[0], variants):
        _, path_ = run_variant(students, one, VARIANTS[name], keep_path=True)
        for k in range(cfg.peers):
            c = colors[k % len(colors)]
            s, t = path_[:, 0, 0, k], path_[:, 1, 0, k]
            ax.plot(s[:, 0], s[:, 1], "-", color=c, linewidth=1, alpha=0.8, label=f"student {k + 1}")
            ax.plot(t[:, 0], t[:, 1], "--", color=c, linewidth=1, alpha=0.8, label=f"teacher {k + 1}")
            ax.plot(*s[0], "o", color=c, markersize=5)
            ax.plot(*t[0], "x", color=c, markersize=7)
        ax.plot(0, 0, "k*", markersize=12, label="ground truth")
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.set_title(VARIANTS[name].label, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"one trial (seed {cfg.seed}, trial {trial}); o = start of a student, x = start of its teacher",
                 fontsize=9)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)


def run(cfg: SimConfig, out: Path, trajectory: bool = False) -> tuple[dict[str, np.ndarray], list[Path]]:
    """Simulate and write simulation.csv, simulation.png (and trajectory.png) under `out`;
    returns the per-trial gaps and the files written."""
    gaps = simulate(cfg)
    curves = {name: g.mean(1) for name, g in gaps.items()}
    files.make_dir(out)
    written = [out / "simulation.csv", out / "simulation.png"]
    write_csv(curves, written[0])
    plot_curves(curves, cfg, written[1])
    if trajectory:
        written.append(out / "trajectory.png")
        plot_trajectory(cfg, written[2])
    return gaps, written


# ----------------------------------------------------------------------------- command line
HELP = {
    "trials": "random trials (paired across variants)", "epochs": "epochs", "peers": "peers K",
    "lr": "step length per unit pull", "ema": "teacher EMA factor a in T <- a T + (1 - a) s",
    "init_steps": "teacher initialisation steps (variants with decoupled knowledge)", "seed": "random seed",
    "variants": f"comma-separated curves out of {', '.join(VARIANTS)}",
    "init": f"initial student points: {', '.join(INITS)} (around the ground truth at the origin)",
    "radius": "disc radius / gaussian std / square half-width / cluster spread",
    "distance": "cluster: distance of the cluster centre from the ground truth",
    "steps_per_epoch": "steps per epoch (the decay weight changes per epoch)",
    "teacher_target": "others: each peer follows the other peers' teachers (as in the loss); own: its own",
    "ensemble_weight": "weight of the pull towards the student ensemble",
    "teacher_weight": "weight of the whole teacher pull (lambda_dk)",
    "rampup": "if > 0, ramp length in epochs of r(e) on the ensemble pull (all) and the teacher pull (PCL only)",
    "init_lr": "step length of the teacher initialisation (default: lr)",
    "beta": "exponential decay rate per epoch", "decay_horizon": "epochs of the cosine and linear decays",
    "measure": f"whose gap is reported: {', '.join(MEASURES)}",
    "converge_tol": "convergence threshold on the mean gap (default 2 * lr)",
    "convergence": "first: first epoch below the threshold; stay: first epoch from which it stays below",
    "final_window": "final gap = mean over this many last epochs",
}


def add_arguments(p) -> None:
    for f in dataclasses.fields(SimConfig):
        kind = {tuple: str, type(None): float}.get(type(f.default), type(f.default))
        default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        choices = {"init": INITS, "teacher_target": TEACHER_TARGETS, "measure": MEASURES,
                   "convergence": CONVERGENCE}.get(f.name)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=default, choices=choices,
                       help=f"{HELP[f.name]} (default: {default})")


def config_from_args(args) -> SimConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SimConfig)}
    values["variants"] = tuple(v.strip() for v in values["variants"].split(",") if v.strip())
    cfg = SimConfig(**values)
    cfg.check()
    return cfg
