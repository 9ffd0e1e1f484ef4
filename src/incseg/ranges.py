"""Valid ranges of numeric config keys (no torch import: the config is checked before any work).

Every numeric key of the config, and every numeric hyperparameter of a method, has a
:class:`Range` stating its bounds and why; :func:`check_range` turns a value outside it into a
:class:`~incseg.errors.ConfigError` that names the key, the valid range, the value and the reason.
Upper bounds are generous: they reject values that cannot be meant (a 10^15-pixel crop) before
they end in an out-of-memory kill or a PyTorch traceback hours later.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from incseg.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Values from ``low`` to ``high``; an end is excluded when its ``*_open`` flag is set.

    ``why`` is the reason for the bounds, shown in the error message.
    """

    low: float
    high: float
    why: str
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """Interval notation, e.g. ``(0, 10]``; integral bounds printed without a decimal point."""

        def show(x: float) -> str:
            return (
                f"{int(x):_}".replace("_", ",")
                if float(x).is_integer() and abs(x) < 1e15
                else f"{x:g}"
            )

        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{left}{show(self.low)}, {show(self.high)}{right}"


def ranged(default: Any, valid: Range) -> Any:
    """A dataclass field with ``default`` whose valid values are ``valid`` (kept in the field's
    metadata, next to the field, for config keys and method hyperparameters alike)."""
    return field(default=default, metadata={"range": valid})


def ranges_of(cls: type) -> dict[str, Range]:
    """``field name -> Range`` of the dataclass ``cls``'s fields declared with :func:`ranged`."""
    return {f.name: f.metadata["range"] for f in dataclasses.fields(cls) if "range" in f.metadata}


def check_range(value: float | tuple[float, ...] | None, valid: Range, key: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``value`` is None or inside ``valid``
    (each element of a tuple, named ``key[i]``)."""
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            check_range(item, valid, f"{key}[{i}]")
        return
    if value is None or valid.contains(value):
        return
    raise ConfigError(f"{key}: must be in {valid.describe()}, got {value!r} ({valid.why})")


SEED = Range(
    0,
    2**32 - 1,
    "a seed; the per-step, per-epoch seeds derived from it (about seed x 1e8) "
    "must fit PyTorch's 64-bit seeds",
)
LOSS_WEIGHT = Range(
    0, 1e6, "a loss weight; 0 turns the term off (the largest published weight is 500)"
)
ALPHA = Range(
    0,
    100,
    "scale of the old logits in the soft targets (1 in the paper); 0 makes them uniform",
    low_open=True,
)
