"""What both faces (the command line and the Python API) do before training: activate the plugins a
run names, then resolve its configuration layers into one typed config."""
from __future__ import annotations

from typing import Any, Iterable

from . import plugins
from .config import resolve


def resolve_run(layers: list[tuple[str, dict[str, Any]]], imports: Iterable[str] = ()) -> Any:
    """Import every plugin the layers (and `imports`) name, then resolve the layers; the resolved
    config's `imports` lists them all, normalised, so the run records what it needs."""
    from .methods import method_configs

    names = plugins.activate([*plugins.imports_in(layers), *imports])
    return resolve([*layers, ("imports", {"imports": names})], method_configs())
