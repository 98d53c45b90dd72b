"""Online-distillation methods, one file each, all behind the `Method` interface."""
from __future__ import annotations

from ..registry import Registry
from .base import Method, Setup, StepOutput
from .dkel import DKEL, PCL
from .independent import Independent

METHODS: Registry[type[Method]] = Registry("method")
for _cls in (Independent, DKEL, PCL):
    METHODS.register(_cls.name, _cls.summary)(_cls)


def method_configs() -> dict[str, type]:
    return {entry.name: entry.obj.Config for entry in METHODS}


__all__ = ["METHODS", "Method", "Setup", "StepOutput", "method_configs"]
