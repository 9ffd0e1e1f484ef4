"""Class-incremental settings: which dataset classes are introduced at each step.

A *setting* is a list of steps; step ``t`` lists the original dataset class ids it introduces.
Class 0 (background for VOC, "other" for ADE20K) always belongs to step 0. The tables follow
docs/protocol.md ("Settings and steps") and the task table of the official MiB code (Cermelli et al., CVPR 2020).

Two class families exist: ``voc`` (20 object classes + background; also used by the built-in
``shapes`` dataset) and ``ade`` (150 classes + "other").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

from incseg.errors import ConfigError

VOC_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


@cache
def ade_class_names() -> tuple[str, ...]:
    """The 151 ADE20K SceneParsing names: index 0 is "other", then the 150 classes."""
    text = resources.files("incseg.resources").joinpath("ade20k_classes.txt").read_text()
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return ("other", *names)


def _consecutive(first: list[int], rest: range, size: int) -> list[list[int]]:
    """Step 0 = ``first``; then ``rest`` cut into chunks of ``size``."""
    items = list(rest)
    return [first] + [items[i : i + size] for i in range(0, len(items), size)]


def _voc_settings() -> dict[str, list[list[int]]]:
    base15 = list(range(16))
    base10 = list(range(11))
    return {
        "offline": [list(range(21))],
        "19-1": [list(range(20)), [20]],
        "19-1b": [[c for c in range(21) if c != 5], [5]],
        "15-5": [base15, list(range(16, 21))],
        "15-1": _consecutive(base15, range(16, 21), 1),
        "10-1": _consecutive(base10, range(11, 21), 1),
        "10-5-5": _consecutive(base10, range(11, 21), 5),
        "5-3": _consecutive(list(range(6)), range(6, 21), 3),
    }


def _ade_settings() -> dict[str, list[list[int]]]:
    base100 = list(range(101))
    settings = {
        "offline": [list(range(151))],
        "100-50": [base100, list(range(101, 151))],
        "100-10": _consecutive(base100, range(101, 151), 10),
        "100-5": _consecutive(base100, range(101, 151), 5),
        "50-50": _consecutive(list(range(51)), range(51, 151), 50),
    }
    text = resources.files("incseg.resources").joinpath("ade20k_orders.json").read_text()
    settings.update(json.loads(text)["orders"])
    return settings


# Names used by the official MiB code for the same settings.
ALIASES: dict[str, dict[str, str]] = {
    "voc": {"15-5s": "15-1"},
    "ade": {"50": "50-50", "50b": "50-50b", "50c": "50-50c"},
}

_FAMILIES = {"voc": _voc_settings, "ade": _ade_settings}


@dataclass(frozen=True)
class Setting:
    """A named class-incremental setting.

    Attributes:
        family: ``"voc"`` or ``"ade"``.
        name: canonical setting name (aliases resolved), e.g. ``"15-1"``.
        steps: per step, the dataset class ids it introduces (step 0 includes class 0).
        class_names: name of every dataset class id, index = class id.
    """

    family: str
    name: str
    steps: tuple[tuple[int, ...], ...]
    class_names: tuple[str, ...]

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def num_classes(self) -> int:
        """Number of dataset class ids, background / "other" included (21 or 151)."""
        return len(self.class_names)


def setting_names(family: str) -> list[str]:
    """Canonical setting names of a family, in table order."""
    return list(_FAMILIES[family]())


@cache
def get_setting(family: str, name: str) -> Setting:
    """Look a setting up by family and name (official aliases accepted).

    Raises:
        ConfigError: unknown family or setting; the message lists the valid names.
    """
    if family not in _FAMILIES:
        raise ConfigError(f"unknown class family {family!r}; expected one of {sorted(_FAMILIES)}")
    table = _FAMILIES[family]()
    canonical = ALIASES[family].get(name, name)
    if canonical not in table:
        aliases = ", ".join(f"{a} (= {c})" for a, c in ALIASES[family].items())
        raise ConfigError(
            f"unknown {family} setting {name!r}; valid settings: {', '.join(table)}; "
            f"aliases: {aliases}"
        )
    names = VOC_CLASS_NAMES if family == "voc" else ade_class_names()
    steps = tuple(tuple(step) for step in table[canonical])
    return Setting(family=family, name=canonical, steps=steps, class_names=names)
