"""Methods, found by name. Add a method: write a :class:`Method` subclass, register it here."""

from __future__ import annotations

from typing import Any

from incseg.errors import ConfigError
from incseg.methods.base import FineTuning, Method
from incseg.methods.lwf import ILT, LwF, LwFMC
from incseg.methods.mib import MiB
from incseg.methods.regularizers import EWC, PI, RW

METHODS: dict[str, type[Method]] = {
    "ft": FineTuning,
    "lwf": LwF,
    "lwf_mc": LwFMC,
    "ilt": ILT,
    "ewc": EWC,
    "rw": RW,
    "pi": PI,
    "mib": MiB,
}


def build_method(name: str, params: dict[str, Any]) -> Method:
    """Instantiate method ``name`` with hyperparameters ``params`` (already validated)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](**params)


__all__ = ["EWC", "ILT", "METHODS", "PI", "RW", "FineTuning", "LwF", "LwFMC", "Method", "MiB", "build_method"]
