"""Class orders (``protocol.order``): which classes each step introduces, beyond the default.

A setting fixes how many classes each step introduces; an order fixes which. ``protocol.order``
is one of

- ``default``: the setting's own table (docs/protocol.md, "Settings and steps");
- a letter naming an official order of the setting: ADE20K's ``b`` and ``c`` (the MiB code's
  100-50b, 100-10c, ...: :data:`incseg.protocol.settings`);
- ``random:K``: the setting's non-background classes shuffled by incseg's own generator seeded
  with ``K`` (:func:`random_order`; SplitMix64 and a Fisher-Yates shuffle, written out here so
  that the permutation is the same on every machine and NumPy / Python version), then cut into
  the setting's step sizes;
- an explicit list of every non-background class of the setting, each once, in the order the
  steps take them.

Everything downstream reads the steps from the ordered :class:`~incseg.protocol.settings.Setting`
(:func:`ordered_setting`): image selection, label remapping, the model's channels (``[0]`` then
the classes in step order), the memory, and the reports' old / new groups (step 0's classes are
"old"). An ordered setting has no official image lists (the shipped lists are per named
setting), so the selection rule applies.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import cache

from incseg.errors import ConfigError
from incseg.protocol.settings import Setting, get_setting

Order = str | tuple[int, ...]
_RANDOM = re.compile(r"random:(\d{1,18})")
_MASK = (1 << 64) - 1


def _splitmix64(state: int) -> tuple[int, int]:
    """One SplitMix64 step (Steele, Lea and Flood, OOPSLA 2014): ``(next state, output)``."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return state, z ^ (z >> 31)


def random_order(classes: Sequence[int], key: int) -> list[int]:
    """``classes`` shuffled by a Fisher-Yates pass whose draws are SplitMix64 outputs seeded with
    ``key``, reduced by rejection so every permutation is equally likely. Pure integer
    arithmetic: the same result everywhere."""
    items = list(classes)
    state = key & _MASK
    for i in range(len(items) - 1, 0, -1):
        bound = i + 1
        limit = (1 << 64) - ((1 << 64) % bound)  # outputs >= limit would bias the modulo
        while True:
            state, value = _splitmix64(state)
            if value < limit:
                break
        j = value % bound
        items[i], items[j] = items[j], items[i]
    return items


def _named(setting: Setting, order: str) -> Setting:
    try:
        return get_setting(setting.family, f"{setting.name}{order}")
    except ConfigError:
        raise ConfigError(
            f"protocol.order: {order!r} names no official order of {setting.family} "
            f"{setting.name}; valid: {valid_orders(setting)}"
        ) from None


def valid_orders(setting: Setting) -> list[str]:
    """The choices of ``protocol.order`` for a setting, for error messages."""
    letters = [c for c in "bc" if _has(setting, c)]
    return ["default", *letters, "random:K", "a list of every class but 0, each once"]


def _has(setting: Setting, letter: str) -> bool:
    try:
        get_setting(setting.family, f"{setting.name}{letter}")
    except ConfigError:
        return False
    return True


def _check_list(setting: Setting, order: tuple[int, ...]) -> None:
    classes = sorted(c for step in setting.steps for c in step if c != 0)
    counts = Counter(order)
    twice = sorted(c for c, n in counts.items() if n > 1)
    unknown = sorted(set(order) - set(classes))
    missing = sorted(set(classes) - set(order))
    problems = []
    if twice:
        problems.append(f"listed more than once: {twice}")
    if unknown:
        problems.append(f"not classes of the setting: {unknown}")
    if missing:
        problems.append(f"missing: {missing}")
    if problems:
        raise ConfigError(
            f"protocol.order: not an order of the {len(classes)} classes of {setting.family} "
            f"{setting.name} (0 excluded): " + "; ".join(problems)
        )


@cache
def ordered_setting(setting: Setting, order: Order) -> Setting:
    """``setting`` with its classes in ``order`` (module docstring); the default order returns
    it unchanged.

    Raises:
        ConfigError: an unknown name, or a list that is not a permutation of the setting's
            classes (naming the classes listed twice, foreign or missing).
    """
    if order == "default":
        return setting
    if isinstance(order, str):
        match = _RANDOM.fullmatch(order)
        if match is None:
            return _named(setting, order)
        classes = [c for step in setting.steps for c in step if c != 0]
        chosen = random_order(sorted(classes), int(match.group(1)))
        label = order
    else:
        _check_list(setting, order)
        chosen, label = list(order), "given"
    sizes = [len([c for c in step if c != 0]) for step in setting.steps]
    steps, start = [], 0
    for index, size in enumerate(sizes):
        step = chosen[start : start + size]
        steps.append(tuple([0, *step] if index == 0 else step))
        start += size
    return Setting(
        setting.family, f"{setting.name} (order {label})", tuple(steps), setting.class_names
    )
