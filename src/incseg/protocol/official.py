"""The official per-step training lists of the MiB code, shipped as image ids (docs/protocol.md,
"Which training images belong to step t").

The official MiB code ships, per setting and step, index arrays into its own image lists; they
were converted once to image ids (``tools/convert_mib_splits.py``) and live in
``incseg/resources/splits/{voc,ade}.json.gz``. VOC has lists for 19-1, 15-5 and 15-1, disjoint
and overlap; for VOC they equal the rule of :func:`incseg.protocol.select_train`. ADE20K has lists
for 100-50, 100-10, 50-50 and their order-b variants; they are a partition of the training
images (each image in one step), not the rule's output. incseg treats that partition as the
``disjoint`` mode of those settings only: ``official`` with ``overlap``, or for an ADE20K setting
without lists (100-5), is an error, never silently something else. PLOP and cssegmentation apply
the disjoint / overlap rule to ADE20K on the fly (``split_source: rule``).

``protocol.split_source``: ``official`` = the shipped lists (an error where none exist for the
dataset, setting and mode); ``rule`` = the rule on the class-presence index; ``auto`` = the lists
where they exist for the dataset, setting and mode, else the rule.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from functools import cache
from importlib import resources

import numpy as np

from incseg.errors import ConfigError


@cache
def _table(dataset: str) -> dict[str, tuple[tuple[str, ...], ...]]:
    if dataset not in ("voc", "ade"):
        return {}
    raw = resources.files("incseg.resources").joinpath("splits", f"{dataset}.json.gz").read_bytes()
    splits = json.loads(gzip.decompress(raw))["splits"]
    return {key: tuple(tuple(step) for step in steps) for key, steps in splits.items()}


def _key(dataset: str, setting: str, mode: str) -> str:
    return f"{setting}/{mode}" if dataset == "voc" else setting


def official_settings(dataset: str) -> list[str]:
    """Keys with shipped lists: ``"15-5/overlap"`` for VOC, ``"100-50"`` for ADE."""
    return sorted(_table(dataset))


def official_split(dataset: str, setting: str, mode: str) -> tuple[tuple[str, ...], ...] | None:
    """Per step, the sorted training image ids of the official lists (``None`` if not shipped).

    Args:
        dataset: ``"voc"`` or ``"ade"`` (other datasets have none).
        setting: canonical setting name, e.g. ``"15-1"``.
        mode: ``"disjoint"`` or ``"overlap"`` (ADE20K's lists are its ``disjoint`` mode).
    """
    if dataset == "ade" and mode != "disjoint":
        return None
    return _table(dataset).get(_key(dataset, setting, mode))


def uses_official(dataset: str, setting: str, mode: str, split_source: str) -> bool:
    """Whether training images come from the shipped lists for ``split_source``.

    Only the real datasets ``voc`` and ``ade`` have lists (the built-in ``shapes`` has none).

    Raises:
        ConfigError: ``official`` where no list is shipped (the config's type admits only
            ``auto``, ``official`` and ``rule``).
    """
    available = official_split(dataset, setting, mode) is not None
    if split_source == "official" and not available:
        have = ", ".join(official_settings(dataset)) or "none"
        if dataset == "ade":
            have = ", ".join(f"{key}/disjoint" for key in official_settings(dataset))
        raise ConfigError(
            f"protocol.split_source: no official lists for {dataset} {setting} ({mode}); "
            f"shipped: {have}; valid choices here: ['auto', 'rule'] (rule: the {mode} filter "
            f"applied on the fly)"
        )
    return split_source != "rule" and available


def select_listed(names: Sequence[str], listed: Sequence[str]) -> tuple[np.ndarray, int]:
    """Indices (sorted) of ``names`` that are in ``listed``, and how many listed ids are absent."""
    wanted = set(listed)
    indices = np.array([i for i, name in enumerate(names) if name in wanted], dtype=np.int64)
    return indices, len(wanted) - len(indices)
