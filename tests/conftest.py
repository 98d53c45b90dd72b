import os
import sys

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Dataset caches go to a per-session temporary folder, never to ~/.cache."""
    monkeypatch.setenv("DKEL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def make_config(**values):
    """A typed run config as the CLI would resolve it (progress off for tests)."""
    from dkel.config import resolve
    from dkel.methods import method_configs

    values.setdefault("progress", "none")
    return resolve([("test", values)], method_configs())


PYTHON = sys.executable


@pytest.fixture
def exploding(monkeypatch):
    """Registers method `exploding`: `independent` with a finite loss in epoch 1 and NaN from epoch 2."""
    from dkel.methods import METHODS
    from dkel.methods.independent import Independent
    from dkel.registry import Entry

    class Exploding(Independent):
        name = "exploding"

        def losses(self, views, labels, progress):
            out = super().losses(views, labels, progress)
            if progress >= 1:
                out.losses["loss"] = out.losses["loss"] * float("nan")
            return out

    monkeypatch.setitem(METHODS._entries, "exploding", Entry("exploding", Exploding, "test"))
