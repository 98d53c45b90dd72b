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
    epochs = [r["epoch"] for r in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
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
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)
