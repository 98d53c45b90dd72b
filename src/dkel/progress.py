"""A progress bar on a terminal, a line every few seconds elsewhere."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, mode: str, total: int, desc: str):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.total, self.desc = mode, total, desc
        self.count = 0
        self.interval = {"bar": 0.5, "lines": 15.0}.get(mode, float("inf"))
        self.last = time.perf_counter()
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

    def advance(self) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)

    def due(self) -> bool:
        """True when it is time to fetch fresh numbers (each fetch waits for the device)."""
        now = time.perf_counter()
        if now - self.last < self.interval and self.count < self.total:
            return False
        self.last = now
        return self.mode != "none"

    def show(self, values: dict[str, float]) -> None:
        text = {k: f"{v:.4g}" if isinstance(v, float) and abs(v) < 1e4 else f"{v:.0f}" for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
        else:
            stats = "  ".join(f"{k} {v}" for k, v in text.items())
            print(f"{self.desc} [{self.count}/{self.total}]  {stats}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
