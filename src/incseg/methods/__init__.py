"""Methods, found by name: the table :data:`METHOD_PATHS`, or the path of a method outside incseg.

Add a built-in method: write a :class:`~incseg.methods.base.Method` subclass and add its
``module:Class`` path to the table. A method outside incseg needs no edit here: ``method.name``
may be the ``module:Class`` path of an importable class (``my_methods:ConfidentPseudo``), or a
name that an installed package registers in the ``incseg.methods`` entry-point group
(docs/methods.md, "Writing a method"). The table holds paths, not classes, so that checking a
method *name* imports nothing; a class (and torch with it) is imported when it is asked for.
"""

from __future__ import annotations

import dataclasses
from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from incseg.errors import ConfigError
from incseg.models.choices import FEATURE_NAMES, QUERY_FEATURE_NAMES

if TYPE_CHECKING:
    from incseg.methods.base import Method

METHOD_PATHS: dict[str, str] = {
    "balconpas": "incseg.methods.balconpas:BalConpas",
    "dkd": "incseg.methods.dkd:DKD",
    "eclipse": "incseg.methods.eclipse:ECLIPSE",
    "ft": "incseg.methods.ft:FineTuning",
    "lwf": "incseg.methods.lwf:LwF",
    "m2f_ft": "incseg.methods.query:QueryFineTuning",
    "m2f_mib": "incseg.methods.comformer:MaskMiB",
    "m2f_plop": "incseg.methods.comformer:MaskPLOP",
    "comformer": "incseg.methods.comformer:CoMFormer",
    "comformer_ft": "incseg.methods.comformer:CoMFormerFT",
    "lwf_mc": "incseg.methods.lwf:LwFMC",
    "ilt": "incseg.methods.lwf:ILT",
    "ewc": "incseg.methods.regularizers:EWC",
    "rw": "incseg.methods.regularizers:RW",
    "pi": "incseg.methods.regularizers:PI",
    "mib": "incseg.methods.mib:MiB",
    "plop": "incseg.methods.plop:PLOP",
    "rcil": "incseg.methods.rcil:RCIL",
    "simcis": "incseg.methods.simcis:SimCIS",
    "reminder": "incseg.methods.reminder:REMINDER",
    "ssul": "incseg.methods.ssul:SSUL",
    "star": "incseg.methods.star:STAR",
}
METHOD_NAMES = tuple(sorted(METHOD_PATHS))
# The built-in methods of the query-based model (model.architecture: mask2former).
QUERY_METHOD_NAMES = (
    "balconpas",
    "comformer",
    "comformer_ft",
    "eclipse",
    "m2f_ft",
    "m2f_mib",
    "m2f_plop",
    "simcis",
)
# Add-ons apply on top of any method (``method.name: mib+ewf``); they act at steps > 0 only.
ADDON_PATHS: dict[str, str] = {
    "ewf": "incseg.methods.ewf:EWF",
    "nest": "incseg.methods.nest:NeST",
    "ucd": "incseg.methods.ucd:UCD",
}
ENTRY_POINT_GROUP = "incseg.methods"


def split_name(name: str) -> tuple[str, list[str]]:
    """``"plop+ewf"`` -> ``("plop", ["ewf"])``: the method and its add-ons, in order."""
    base, *addons = name.split("+")
    return base, addons


def addon_class(name: str) -> type:
    """The class of add-on ``name``.

    Raises:
        ConfigError: an unknown add-on (the valid ones are listed).
    """
    if name not in ADDON_PATHS:
        raise ConfigError(
            f"method.name: unknown add-on {name!r}; valid add-ons: {sorted(ADDON_PATHS)} (after the "
            "method and a +, e.g. mib+ewf)"
        )
    module, attr = ADDON_PATHS[name].split(":")
    return getattr(import_module(module), attr)


def plugin_paths() -> dict[str, str]:
    """``name -> module:Class`` of the methods installed packages register as entry points."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def check_method_name(name: str) -> None:
    """Cheap check of a ``method.name`` (a ``module:Class`` path is imported, and checked, by
    :func:`method_class`); ``+ADDON`` suffixes are checked against the add-on table."""
    if isinstance(name, str) and "+" in name:
        base, addons = split_name(name)
        for addon in addons:
            if addon not in ADDON_PATHS:
                addon_class(addon)  # raises, listing the add-ons
        name = base
    if not isinstance(name, str) or not (
        name in METHOD_PATHS or ":" in name or name in plugin_paths()
    ):
        hint = ""
        if isinstance(name, str) and name.endswith("-m") and name[:-2] in METHOD_PATHS:
            hint = (
                f"; the -M variant is {name[:-2]!r} with method.memory_size (e.g. 100), or "
                f"`incseg compare --methods {name}`"
            )
        raise ConfigError(
            f"method.name: unknown value {name!r}; valid choices: "
            f"{[*METHOD_NAMES, *sorted(plugin_paths())]}, or the module:Class path of a Method "
            f"subclass (e.g. my_methods:ConfidentPseudo){hint}"
        )


def method_class(name: str) -> type[Method]:
    """The class of ``name``: a built-in name, an ``incseg.methods`` entry point, or a
    ``module:Class`` path.

    Raises:
        ConfigError: unknown name (the valid ones are listed), a module that does not import, a
            missing attribute, a class that is not a dataclass subclass of ``Method``, or one
            that asks for unknown features.
    """
    check_method_name(name)
    name = split_name(name)[0]  # the class of mib+ewf is MiB's: add-ons wrap the instance
    path = METHOD_PATHS.get(name) or plugin_paths().get(name) or name
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(import_module(module_name), attr, None)
    except ImportError as err:
        raise ConfigError(
            f"method.name: {name!r}: cannot import module {module_name!r} ({err})"
        ) from None
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
    valid = FEATURE_NAMES + QUERY_FEATURE_NAMES
    unknown = sorted(set(cls.features) - set(valid))
    if unknown:
        raise ConfigError(
            f"method.name: {name!r} asks for unknown features {unknown}; valid: {list(valid)}"
        )
    return cls


def __getattr__(name: str):  # PEP 562: METHODS and the classes import on first use
    if name == "METHODS":
        return {key: method_class(key) for key in METHOD_NAMES}
    classes = {path.split(":")[1]: path for path in METHOD_PATHS.values()}
    classes["Method"] = "incseg.methods.base:Method"
    if name in classes:
        module, attr = classes[name].split(":")
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'incseg.methods' has no attribute {name!r}")
