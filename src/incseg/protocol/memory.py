"""The exemplar memory of the -M variants (SSUL-M, DKD-M): which earlier training images a step
keeps, by the class-balanced rule the official codes share (docs/methods.md, "Exemplar memory").

At step ``t >= 1`` the candidates are the previous memory's images and every training image of
step ``t - 1``, each with the classes it holds (:class:`Exemplar`); the selection
(:func:`select_balanced`) shuffles the candidates, then the old object classes, and takes turns:
each class in that order takes the first remaining candidate that holds it, until ``size`` images
are taken (clovaai/SSUL ``utils/memory.py:103-124``; cvlab-yonsei/DKD ``utils/memory.py:127-147``
is the same loop). ``size`` is the memory's total, not a per-class count. Nothing here reads
images: the engine computes each candidate's classes (:mod:`incseg.engine.memory`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, replace

import numpy as np

from incseg.errors import DataError


@dataclass(frozen=True)
class Exemplar:
    """One memory image.

    Attributes:
        index: its position in the training source.
        name: its image id.
        step: the step whose training images it came from.
        classes: dataset class ids it holds, as the selection saw them (background excluded).
        chosen_for: the class whose turn took it (0 while it is only a candidate).
    """

    index: int
    name: str
    step: int
    classes: tuple[int, ...]
    chosen_for: int = 0

    def to_dict(self) -> dict:
        return asdict(self) | {"classes": list(self.classes)}

    @classmethod
    def from_dict(cls, raw: dict) -> Exemplar:
        return cls(
            int(raw["index"]),
            str(raw["name"]),
            int(raw["step"]),
            tuple(int(c) for c in raw["classes"]),
            int(raw.get("chosen_for", 0)),
        )


def select_balanced(
    candidates: list[Exemplar], classes: list[int], size: int, rng: np.random.Generator
) -> list[Exemplar]:
    """Class-balanced selection of ``size`` candidates (module docstring).

    Args:
        candidates: in the official order (the previous memory first, then step ``t - 1``'s
            images in dataset order).
        classes: the old object classes (dataset ids, background excluded), ascending.
        size: images to take in total.
        rng: drawn from twice: one shuffle of the candidates, then one of the class order (the
            official draws, in that order, from ``np.random``).

    Returns:
        The chosen exemplars, each with ``chosen_for`` set, grouped by that class (ascending) and
        in the order taken within a class: the order the official codes save, and so the order
        in which they are the next step's first candidates (SSUL ``memory.py:129-133``, DKD
        ``memory.py:164-169``).

    Raises:
        DataError: fewer than ``size`` candidates hold an old class. The official loop never
            ends then (SSUL ``memory.py:111-124``, DKD ``memory.py:135-147``).
    """
    pool = list(candidates)
    rng.shuffle(pool)
    order = list(classes)
    rng.shuffle(order)
    chosen: list[Exemplar] = []
    while len(chosen) < size:
        before = len(chosen)
        for cls in order:
            for position, candidate in enumerate(pool):
                if cls in candidate.classes:
                    chosen.append(replace(candidate, chosen_for=cls))
                    del pool[position]
                    break
            if len(chosen) >= size:
                break
        if len(chosen) == before:
            raise DataError(
                f"exemplar memory: only {len(chosen)} of the candidate images hold an old class, "
                f"fewer than the memory size {size} (method.memory_size); lower it"
            )
    return sorted(chosen, key=lambda e: e.chosen_for)  # stable: the order taken within a class


def memory_summary(exemplars: list[Exemplar], names: dict[int, str]) -> str:
    """``"100 images: aeroplane 7, bicycle 7, ..."``: how many images each class's turn took."""
    if not exemplars:
        return "no images"
    counts = Counter(e.chosen_for for e in exemplars)
    parts = ", ".join(f"{names.get(c, c)} {n}" for c, n in sorted(counts.items()))
    return f"{len(exemplars)} images: {parts}"
