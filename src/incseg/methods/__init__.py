"""Methods, found by name. Add a method: write a :class:`~incseg.methods.base.Method` subclass and
register its ``module:Class`` path in :data:`METHOD_PATHS`.

A method outside incseg needs no edit here: ``method.name`` may be the ``module:Class`` path of
any importable class (``my_methods:ConfidentPseudo``), or a name that an installed package registers in
the ``incseg.methods`` entry-point group (``[project.entry-points."incseg.methods"]`` in its
``pyproject.toml``, ``confident = "my_methods:ConfidentPseudo"``). Both are validated like the built-in
methods (``docs/methods.md``, "Writing a method").

The table holds paths, not classes, so that checking a method *name* imports nothing; a method's
class (and torch with it) is imported when its hyperparameters are checked or it is built.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from incseg.errors import ConfigError
from incseg.models.choices import FEATURE_NAMES

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
ENTRY_POINT_GROUP = "incseg.methods"


def plugin_paths() -> dict[str, str]:
    """``name -> module:Class`` of the methods installed packages register as entry points."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def check_method_name(name: str) -> None:
    """Cheap check of a ``method.name`` (imports nothing for ``module:Class`` paths, which
    :func:`method_class` checks when it imports them)."""
    if not isinstance(name, str) or not (
        name in METHOD_PATHS or ":" in name or name in plugin_paths()
    ):
        choices = [*METHOD_NAMES, *sorted(plugin_paths())]
        raise ConfigError(
            f"method.name: unknown value {name!r}; valid choices: {choices}, or the module:Class "
            "path of a Method subclass (e.g. my_methods:ConfidentPseudo)"
        )


def method_class(name: str) -> type[Method]:
    """The class of ``name``: a built-in name, an ``incseg.methods`` entry point, or a
    ``module:Class`` path.

    Raises:
        ConfigError: unknown name (the valid ones are listed), a module that does not import, a
            missing attribute, or a class that is not a dataclass subclass of ``Method``.
    """
    check_method_name(name)
    path = METHOD_PATHS.get(name) or plugin_paths().get(name) or name
    module_name, _, attr = path.partition(":")
    try:
        module = import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"method.name: {name!r}: cannot import module {module_name!r} ({err})"
        ) from None
    cls = getattr(module, attr, None)
    from incseg.methods.base import Method  # torch: only once a class is asked for

    if cls is None:
        raise ConfigError(
            f"method.name: {name!r}: module {module_name!r} has no attribute {attr!r}"
        )
    if not (isinstance(cls, type) and issubclass(cls, Method) and dataclasses.is_dataclass(cls)):
        raise ConfigError(
            f"method.name: {name!r} is not a method: expected a @dataclass subclass of "
            "incseg.methods.base.Method"
        )
    unknown = sorted(set(cls.features) - set(FEATURE_NAMES))
    if unknown:
        raise ConfigError(
            f"method.name: {name!r} asks for unknown features {unknown}; valid: {list(FEATURE_NAMES)}"
        )
    return cls


def describe_method(name: str) -> str:
    """What ``incseg methods NAME`` prints: the class, its docstring, what it asks of the engine
    and every hyperparameter (``method.KEY``) with its type, default and valid range."""
    cls = method_class(name)
    hints = typing.get_type_hints(cls)
    lines = [f"{name}: {cls.__module__}:{cls.__qualname__}", ""]
    lines += [f"  {line}".rstrip() for line in inspect.cleandoc(cls.__doc__ or "").splitlines()]
    asks = [f"{attr}={getattr(cls, attr)!r}" for attr in
            ("needs_old_model", "features", "scans_old_model", "needs_gradients", "plain_first_step")]  # fmt: skip
    lines += [
        "",
        f"  engine: {', '.join(asks)}",
        "",
        "  hyperparameters (method.KEY: type = default):",
    ]
    fields = [f for f in dataclasses.fields(cls) if f.init]
    for f in fields:
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        valid = cls.ranges.get(f.name)
        where = f"  in {valid.describe()}" if valid is not None else ""
        lines.append(f"    {f.name}: {kind} = {f.default!r}{where}")
    if not fields:
        lines.append("    (none)")
    return "\n".join(lines)


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
