"""Methods, found by name. Add a method: write a :class:`~incseg.methods.base.Method` subclass and
register its ``module:Class`` path in :data:`METHOD_PATHS`.

The table holds paths, not classes, so that checking a method *name* imports nothing; a method's
class (and torch with it) is imported when its hyperparameters are checked or it is built.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from incseg.errors import ConfigError

if TYPE_CHECKING:
    from incseg.methods.base import Method

METHOD_PATHS: dict[str, str] = {
    "ft": "incseg.methods.ft:FineTuning",
    "lwf": "incseg.methods.lwf:LwF",
    "lwf_mc": "incseg.methods.lwf:LwFMC",
    "ilt": "incseg.methods.lwf:ILT",
    "ewc": "incseg.methods.regularizers:EWC",
    "rw": "incseg.methods.regularizers:RW",
    "pi": "incseg.methods.regularizers:PI",
    "mib": "incseg.methods.mib:MiB",
    "plop": "incseg.methods.plop:PLOP",
}
METHOD_NAMES = tuple(sorted(METHOD_PATHS))


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; unknown names list the registered ones."""
    if name not in METHOD_PATHS:
        raise ConfigError(
            f"method.name: unknown value {name!r}; valid choices: {list(METHOD_NAMES)}"
        )
    module, attr = METHOD_PATHS[name].split(":")
    return getattr(import_module(module), attr)


def build_method(name: str, params: dict[str, Any]) -> Method:
    """Instantiate method ``name`` with hyperparameters ``params`` (already validated)."""
    return method_class(name)(**params)


_CLASSES = {path.split(":")[1]: path for path in METHOD_PATHS.values()} | {
    "Method": "incseg.methods.base:Method"
}
__all__ = [
    "EWC",
    "ILT",
    "METHODS",
    "METHOD_NAMES",
    "METHOD_PATHS",
    "PI",
    "PLOP",
    "RW",
    "FineTuning",
    "LwF",
    "LwFMC",
    "Method",
    "MiB",
    "build_method",
    "method_class",
]  # fmt: skip


def __getattr__(name: str):  # PEP 562: METHODS and the classes import on first use
    if name == "METHODS":
        return {key: method_class(key) for key in METHOD_NAMES}
    if name in _CLASSES:
        module, attr = _CLASSES[name].split(":")
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'incseg.methods' has no attribute {name!r}")
