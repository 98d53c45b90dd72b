"""Online-distillation methods, one file each, all behind the `Method` interface."""
from __future__ import annotations

from ..registry import Registry
from .base import Method, Setup, StepOutput
from .cl import CL
from .dkel import DKEL, PCL
from .dml import DML
from .independent import Independent
from .kdcl import KDCL
from .okddip import OKDDip
from .one import ONE

METHODS: Registry[type[Method]] = Registry("method")
for _cls in (Independent, DKEL, PCL, DML, CL, ONE, OKDDip, KDCL):
    METHODS.register(_cls.name, _cls.summary)(_cls)


def method_configs() -> dict[str, type]:
    return {entry.name: entry.obj.Config for entry in METHODS}


__all__ = ["METHODS", "Method", "Setup", "StepOutput", "method_configs"]
