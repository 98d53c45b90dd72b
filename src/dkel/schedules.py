"""A figure of DKEL's weight schedules, drawn from the functions the training loss uses (losses.py),
with the time constants scaled to a run of `epochs` epochs as `time_scale=auto` does."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import files
from .config import TimeScale
from .losses import decay_weight, dkel_weights, sigmoid_rampup

DECAY_KINDS = ("exp", "cos", "linear")


def decay_curves(epochs: int, paper_epochs: int = 300, beta: float = 0.5, horizon: float = 10.0,
                 points: int = 400) -> dict[str, np.ndarray]:
    """w over the first epochs of a run, at fractional progress: the x axis ("epoch") and one curve per
    decay (exp, cos, linear) and for the released code ("reference", a function of the paper's epoch)."""
    time = TimeScale(epochs / paper_epochs, paper_epochs=paper_epochs)
    beta_run, horizon_run = time.rate(beta), time.epochs(horizon)
    x = np.linspace(0, min(epochs, 4 * horizon_run), points)
    curves = {"epoch": x}
    for kind in DECAY_KINDS:
        curves[kind] = np.array([decay_weight(time.at(e), kind, beta_run, horizon_run) for e in x])
    curves["reference"] = np.array([dkel_weights(time.paper_epoch(e), mode="reference", beta=beta)["decay"]
                                    for e in x])
    return curves


def plot_schedules(path: Path, epochs: int = 300, beta: float = 0.5, horizon: float = 10.0,
                   rampup_length: float = 80.0, paper_epochs: int = 300) -> None:
    """Ramp-up r(e) (SPEC reconstruction vs released code) and the ensemble decays w(e), for a run of
    `epochs` epochs with the paper's constants (given at `paper_epochs`) scaled to it."""
    from .plots import plt

    time = TimeScale(epochs / paper_epochs, paper_epochs=paper_epochs)
    ramp = time.epochs(rampup_length)
    e = np.linspace(0, epochs, 601)
    paper_r = [sigmoid_rampup(time.at(x), ramp) for x in e]
    ref_r = [dkel_weights(time.paper_epoch(x), mode="reference", beta=beta, rampup_length=rampup_length)["rampup"]
             for x in e]
    scale = (f"a {epochs}-epoch run: the paper's constants (for {paper_epochs} epochs) x {time.factor:.3g}, "
             "weights per step" if time.scaled else f"a {epochs}-epoch run: the paper's constants, weights per epoch")
    fig, (ax_r, ax_log, ax_w) = plt.subplots(1, 3, figsize=(15, 4))
    ax_r.plot(e, paper_r, label=f"paper mode: exp(-5 (1 - e/{ramp:.3g})^2), max 1")
    ax_r.plot(e, ref_r, label="released code (reference mode); also its DK weight")
    ax_r.plot(e, [1.0] * len(e), ":", color="grey", label="paper mode DK weight (not ramped by default)")
    ax_r.set(title="ramp-up r(e) of the peer-ensemble term", xlabel="epoch", ylabel="weight")
    # on a log axis the reference ramp's 6.7e-4 at e = 0 and its zeros (not drawn) until the cutoff show
    ax_log.semilogy(e, paper_r, label="paper mode")
    ax_log.semilogy(e, np.where(np.asarray(ref_r) > 0, ref_r, np.nan), "o-", markersize=2,
                    label="released code (0 where not drawn)")
    ax_log.set(title="ramp-up, log scale", xlabel="epoch", ylabel="weight", ylim=(1e-4, 3))
    ax_log.annotate(f"released code: {ref_r[0]:.1e} in its epoch 0,\nthen 0 until its epoch {rampup_length:g}",
                    xy=(0, ref_r[0]), xytext=(0.2 * epochs, 2e-3), fontsize=8,
                    arrowprops={"arrowstyle": "->", "linewidth": 0.8})
    curves = decay_curves(epochs, paper_epochs, beta, horizon)
    labels = {"exp": f"exp(-{time.rate(beta):.3g} e)", "cos": f"cosine, horizon {time.epochs(horizon):.3g}",
              "linear": f"linear, horizon {time.epochs(horizon):.3g}"}
    for kind in DECAY_KINDS:
        ax_w.plot(curves["epoch"], curves[kind], label=labels[kind])
    ax_w.step(curves["epoch"], curves["reference"], where="post", linestyle="--",
              label="released code: exp, 0 once <= 0.01")
    ax_w.set(title="decaying-ensemble weight w(e)", xlabel="epoch", ylabel="weight")
    for ax in (ax_r, ax_log, ax_w):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(scale, fontsize=10)
    fig.tight_layout()
    files.save_figure(fig, Path(path), dpi=110)
