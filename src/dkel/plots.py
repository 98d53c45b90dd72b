"""PNG figures of a run's curves."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

from . import files

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# individual peers (student2) and maxima would bury the lines that matter
_DETAIL = re.compile(r"\d+$|_max$")


def plot_run(history: list[dict[str, Any]], method, path: Path) -> None:
    """Test accuracy and training loss per epoch, plus the method's instruments if it has them."""
    epochs = [r["epoch"] for r in history]
    shares = [k for k in history[-1] if k.startswith("grad_share_")]
    teacher = [k for k in ("init_teacher_weight", "probe_agree_student_teacher", "probe_agree_teacher_peers",
                           "probe_kl_student_teacher") if k in history[-1]]
    panels = 2 + bool(shares) + bool(teacher)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    ax_acc, ax_loss = axes[:2]
    deploy = f"test_{method.deploy_metric}"
    for key in history[-1]:
        if key.startswith("test_") and (key == deploy or not _DETAIL.search(key)):
            ax_acc.plot(epochs, [r.get(key) for r in history], label=key[5:] + (" (deployed)" if key == deploy else ""),
                        linewidth=2.5 if key == deploy else 1.2)
    ax_acc.set(xlabel="epoch", ylabel="test top-1 accuracy", title=f"{method.name}: test accuracy")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train loss")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training loss")
    ax_loss.grid(alpha=0.3)
    extra = list(axes[2:])
    if shares:
        ax = extra.pop(0)
        ax.stackplot(epochs, *[[r.get(k) or 0.0 for r in history] for k in shares],
                     labels=[k[len("grad_share_"):] for k in shares], alpha=0.8)
        ax.set(xlabel="epoch", ylabel="share of the gradient norm", ylim=(0, 1),
               title="loss terms' share of the gradient at the student logits (probe batch)")
        ax.legend(fontsize=8, loc="upper right")
    if teacher:
        ax = extra.pop(0)
        for key in teacher:
            ax.plot(epochs, [r.get(key) for r in history], label=key.replace("probe_", ""))
        ax.set(xlabel="epoch", title="teacher: initial weight, agreement, KL (probe batch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)
