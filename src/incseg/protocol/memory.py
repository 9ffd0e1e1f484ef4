"""The exemplar memory of the -M variants (SSUL-M, DKD-M, STAR-M): which earlier training images
a step keeps, by the class-balanced rule the official codes share (docs/methods.md, "Exemplar
memory").

At step ``t >= 1`` the candidates are the previous memory's images and every training image of
step ``t - 1``, each with the classes it holds (:class:`Exemplar`); the selection
(:func:`select_balanced`) shuffles the candidates, then the old object classes, and takes turns:
each class in that order takes the first remaining candidate that holds it, until ``size`` images
are taken (clovaai/SSUL ``utils/memory.py:103-124``; cvlab-yonsei/DKD ``utils/memory.py:127-147``
is the same loop). ``size`` is the memory's total, not a per-class count. Nothing here reads
images: the engine computes each candidate's classes (:mod:`incseg.engine.memory`).

How each official code gathers the candidates (the previous memory's saved candidates first, then
step ``t - 1``'s training images in the order its loader yields them):

- SSUL (clovaai/SSUL at e08ee9c): in dataset order, each image resized and centre-cropped: a
  loader with ``shuffle=False`` (``utils/memory.py:38-42``) over the step's training set with
  ``ExtResize`` + ``ExtCenterCrop`` (``:23-29``); the previous memory from ``:48-52``.
- DKD (cvlab-yonsei/DKD at fb4693f): in a *shuffled* order, each image randomly cropped:
  ``train_voc.py:78`` (``train_ade.py:78``) passes ``get_old_train_loader()``, a ``DataLoader``
  given no sampler, hence ``shuffle=True`` (``data_loader/data_loaders.py:94-96``, ``:212-214``),
  over ``prev_train_set`` built with the *training* arguments (``:52-58``, ``:168-174``), so its
  ``transform_tr``: ``RandomResizedCrop(crop_size, (0.5, 2.0))`` and a horizontal flip
  (``data_loader/dataset.py:140-152``; the crop, ``custom_transforms.py:527-591``, is a random
  region of the image, falling back to the centre after ten failed tries, resized to
  ``crop_size`` squared); the previous memory from ``utils/memory.py:81-88``, the images at
  ``:94-116``.
- STAR (jinpeng0528/STAR at 9e31f36): DKD's code, same files and lines (``train_voc.py:78``,
  ``data_loaders.py:94-96``, ``dataset.py:140-152``, ``utils/memory.py:94-116``).

The order alone changes no distribution: the selection shuffles the whole candidate list first
(SSUL ``memory.py:104-105``, DKD and STAR ``memory.py:128-129``), so any starting order gives a
uniform permutation; it changes which images a given seed picks. The crop does change it: which
classes a DKD or STAR candidate holds is read from one random crop (and, from step 2 on, the old
model's pseudo-labels on that crop), where SSUL, and incseg for every method, read them from the
centre crop. incseg's DKD-M and STAR-M therefore pick from a different distribution than the
official ones (a class near an image's border can be in one crop and not in the other); SSUL-M's
is the official one.
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
        candidates: the previous memory first, then step ``t - 1``'s images in dataset order:
            SSUL's order; DKD and STAR take the step's images in a shuffled order (module
            docstring), which the first shuffle here makes irrelevant to the distribution.
        classes: the old object classes (dataset ids, background excluded), ascending.
        size: images to take in total.
        rng: drawn from twice: one shuffle of the candidates, then one of the class order (the
            official codes draw the same two shuffles, in that order, from ``np.random``: SSUL
            ``memory.py:104-108``, DKD and STAR ``memory.py:128-132``).

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


def greedy_by_frequency(
    vectors: np.ndarray, target: np.ndarray, count: int, start: np.ndarray
) -> tuple[list[int], np.ndarray]:
    """BalConpas's greedy selection (jinpeng0528/BalConpas 3b76142
    ``continual/memory_generator/memory_selection_sem.py:60-85``): ``count`` times, take the
    remaining row of ``vectors`` whose addition to the running counts brings their normalised
    histogram closest, in L1, to ``target``; ties go to the first row (the official's strict
    ``<`` in iteration order). A row that leaves the counts all zero scores NaN there and is
    never taken.

    Args:
        vectors: ``(N, K)`` per candidate the classes it counts (0 / 1).
        target: ``(K,)`` the histogram to follow (sums to 1).
        count: rows to take (at most ``N``).
        start: ``(K,)`` the counts so far.

    Returns:
        The rows taken, in order, and the counts after them.
    """
    taken: list[int] = []
    current = start.astype(np.float64)
    free = np.ones(len(vectors), dtype=bool)
    for _ in range(count):
        counts = current + vectors
        totals = counts.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.abs(counts / totals - target).sum(axis=1)
        score[~free | ~np.isfinite(score)] = np.inf
        best = int(np.argmin(score))
        if not np.isfinite(score[best]):
            raise DataError(
                f"exemplar memory: only {len(taken)} candidates hold a class to count, fewer "
                f"than the {count} to take (method.memory_size); lower it"
            )
        taken.append(best)
        free[best] = False
        current = current + vectors[best]
    return taken, current


def select_by_frequency(
    previous: list[Exemplar],
    candidates: list[Exemplar],
    counts: np.ndarray,
    keep: int,
    size: int,
) -> list[Exemplar]:
    """BalConpas's memory (``memory_selection_sem.py:101-199``): the global class histogram
    ``counts / counts.sum()`` is the target; first ``keep`` images of the previous memory are
    taken greedily (:func:`greedy_by_frequency`) from zero counts, then ``size - keep`` of the
    candidates that are not in the previous memory, the counts carried on.

    Args:
        previous: the previous memory, each with the classes it counts now (its own kept
            classes, and the previous step's classes if it is one of that step's images too,
            ``:40-57``).
        candidates: the previous step's training images with its classes they hold.
        counts: ``(256,)`` per dataset class the number of training images that hold it, each
            class counted over the step that introduced it (``:8-21``, carried over steps).
        keep: images of the previous memory to keep (``int(size * old / seen)``, ``:104-121``).
        size: images in all.

    Returns:
        The memory, previous images first, each with ``chosen_for`` 0 (no class's turn).
    """
    target = counts / counts.sum()

    def rows(group: list[Exemplar]) -> np.ndarray:
        vectors = np.zeros((len(group), len(counts)))
        for row, e in enumerate(group):
            vectors[row, list(e.classes)] = 1.0
        return vectors

    kept, current = greedy_by_frequency(
        rows(previous), target, min(keep, len(previous)), np.zeros(len(counts))
    )
    seen = {e.index for e in previous}
    fresh = [e for e in candidates if e.index not in seen]
    added, _ = greedy_by_frequency(rows(fresh), target, size - len(kept), current)
    return [replace(previous[i], chosen_for=0) for i in kept] + [
        replace(fresh[i], chosen_for=0) for i in added
    ]


def memory_summary(exemplars: list[Exemplar], names: dict[int, str]) -> str:
    """``"100 images: aeroplane 7, bicycle 7, ..."``: how many images each class's turn took
    (a selection without turns, BalConpas's: how many images hold each class)."""
    if not exemplars:
        return "no images"
    if all(e.chosen_for == 0 for e in exemplars):
        counts = Counter(c for e in exemplars for c in e.classes)
        parts = ", ".join(f"{names.get(c, c)} {n}" for c, n in sorted(counts.items()))
        return f"{len(exemplars)} images holding {parts}"
    counts = Counter(e.chosen_for for e in exemplars)
    parts = ", ".join(f"{names.get(c, c)} {n}" for c, n in sorted(counts.items()))
    return f"{len(exemplars)} images: {parts}"
