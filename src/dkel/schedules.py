"""A figure of DKEL's weight schedules, drawn from the functions the training loss uses (losses.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import files
from .losses import decay_weight, dkel_weights, sigmoid_rampup


def plot_schedules(path: Path, epochs: int = 300, beta: float = 0.5, horizon: float = 10.0,
                   rampup_length: float = 80.0) -> None:
    """Ramp-up r(e) (paper vs released code) and the ensemble decays w(e) (exp, cos, linear)."""
    from .plots import plt

    e = np.arange(epochs + 1)
    paper_r = [sigmoid_rampup(x, rampup_length) for x in e]
    reference = [dkel_weights(x, mode="reference", beta=beta, rampup_length=rampup_length) for x in e]
    ref_r = [w["rampup"] for w in reference]
    fig, (ax_r, ax_log, ax_w) = plt.subplots(1, 3, figsize=(15, 4))
    paper_dk = [dkel_weights(x, rampup_length=rampup_length)["dk"] for x in e]
    ax_r.plot(e, paper_r, label=f"paper: exp(-5 (1 - e/{rampup_length:g})^2), max 1")
    ax_r.plot(e, ref_r, label="released code (reference mode); also its DK weight")
    ax_r.plot(e, paper_dk, ":", color="grey", label="paper mode DK weight (not ramped by default)")
    ax_r.set(title="ramp-up r(e) of the peer-ensemble term", xlabel="epoch", ylabel="weight")
    # on a log axis the reference ramp's 6.7e-4 at e = 0 and its zeros (not drawn) until the cutoff show
    ax_log.semilogy(e, paper_r, label="paper")
    ax_log.semilogy(e, np.where(np.asarray(ref_r) > 0, ref_r, np.nan), "o-", markersize=2,
                    label="released code (0 where not drawn)")
    ax_log.set(title="ramp-up, log scale", xlabel="epoch", ylabel="weight", ylim=(1e-4, 3))
    ax_log.annotate(f"released code: {ref_r[0]:.1e} at e=0,\n{ref_r[1]:.0e} at e=1 (off scale),\n"
                    f"0 for e=2..{rampup_length:g}", xy=(0, ref_r[0]), xytext=(0.2 * epochs, 2e-3), fontsize=8,
                    arrowprops={"arrowstyle": "->", "linewidth": 0.8})
    span = np.linspace(0, min(epochs, 4 * horizon), 400)
    for kind, label in (("exp", f"exp(-{beta:g} e)"), ("cos", f"cosine, horizon {horizon:g}"),
                        ("linear", f"linear, horizon {horizon:g}")):
        ax_w.plot(span, [decay_weight(x, kind, beta, horizon) for x in span], label=label)
    ax_w.step(span, [dkel_weights(x, mode="reference", beta=beta)["decay"] for x in span], where="post",
              linestyle="--", label="released code: exp, 0 once <= 0.01")
    ax_w.set(title="decaying-ensemble weight w(e)", xlabel="epoch", ylabel="weight")
    for ax in (ax_r, ax_log, ax_w):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, Path(path), dpi=110)
