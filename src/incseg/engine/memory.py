"""A step's exemplar memory (:mod:`incseg.protocol.memory`): its candidates and their classes,
the selection, and the file that keeps it in the run directory (``memory_step_K.json``; the step
checkpoint holds a copy for the next step and for runs started from it).

The candidates' classes come from one pass over step ``t - 1``'s training images, resized and
centre-cropped to ``data.crop_size`` (SSUL ``utils/memory.py:23-42``), with the labels of step
``t - 1`` (old classes are background there); from step 2 on, the method may fill that background
with the old model's confident predictions (:meth:`~incseg.methods.base.Method.
memory_pseudo_labels`; SSUL ``memory.py:62-78``, DKD ``memory.py:95-105``).

A memory file is read back, on every rank and on resume, only after it passed two checks: its
digest (``sha256`` of its entries, written with it) and every entry against the step's candidates
(:meth:`StepMemory.check`). A file edited by hand, cut short or copied from another run is named
and refused, never used: a bad memory would otherwise reach ``step_K.pt`` and every later step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from incseg.config import Config
from incseg.data import Source, StepDataset
from incseg.data.transforms import test_transform
from incseg.engine.checkpoint import atomic_write
from incseg.engine.runtime import Runtime
from incseg.errors import DataError
from incseg.protocol import StepInfo, make_lut, step_info
from incseg.protocol.memory import Exemplar, select_balanced, select_by_frequency

log = logging.getLogger(__name__)


class _Malformed(ValueError):
    """What is wrong with a memory file's content (:meth:`StepMemory.check`)."""


_FIELDS = {"index": int, "name": str, "step": int, "classes": list, "chosen_for": int}


@dataclass(frozen=True)
class StepMemory:
    """The exemplar memory of step ``info.step`` (>= 1) of a run.

    Attributes:
        config: the run's config (``train.seed``, ``data.crop_size``, the label convention).
        source: the training source the indices point into.
        rt: device and autocast of the pass over the candidates.
        info: the step the memory is for.
        previous: step ``t - 1``'s memory (empty at step 1).
        indices: step ``t - 1``'s training images, the other candidates.
        size: images to keep (``method.memory_size``).
        earlier: with the ``frequency`` rule, the training images of steps ``0..t - 2``, whose
            classes the target histogram counts too.
        rule: ``balanced`` (SSUL's turns, :func:`~incseg.protocol.memory.select_balanced`) or
            ``frequency`` (BalConpas's, :func:`~incseg.protocol.memory.select_by_frequency`).
    """

    config: Config
    source: Source
    rt: Runtime
    info: StepInfo
    previous: list[Exemplar]
    indices: np.ndarray
    size: int
    earlier: tuple[np.ndarray, ...] = ()
    rule: str = "balanced"

    @property
    def previous_step(self) -> StepInfo:
        return step_info(self.config.setting, self.info.step - 1)

    @torch.no_grad()
    def candidate_classes(
        self, pseudo: Callable | None = None, model: nn.Module | None = None
    ) -> list[tuple[int, ...]]:
        """The dataset classes (background and void excluded) of each of :attr:`indices` as the
        selection sees them (module docstring); with ``model`` the labels are first passed through
        ``pseudo(model_output, labels, info)``."""
        prev, data = self.previous_step, self.config.data
        lut = make_lut(prev, "train", self.config.protocol.labels)
        dataset = StepDataset(self.source, self.indices, lut, test_transform(data.crop_size))
        loader = DataLoader(
            dataset, batch_size=self.config.train.eval_batch_size, num_workers=data.num_workers
        )
        order, found = torch.tensor(prev.order), []
        for images, labels in loader:
            labels = labels.to(self.rt.device).long()
            if model is not None:
                images = images.to(self.rt.device, memory_format=self.rt.memory_format)
                with self.rt.autocast():
                    labels = pseudo(model(images), labels, prev)
            for label in labels:
                values = label.unique().cpu()
                values = values[(values > 0) & (values < len(order))]
                found.append(tuple(order[values].tolist()))
        return found

    def choose(self, pseudo: Callable | None, old_model: nn.Module | None) -> list[Exemplar]:
        """The memory: :attr:`previous` and :attr:`indices` as candidates, :attr:`size` taken, the
        old model's pseudo-labels used from step 2 on. The draws come from a generator seeded by
        ``train.seed`` and the step, so the same run chooses the same images."""
        if self.rule == "frequency":
            return self.choose_by_frequency()
        prev = self.previous_step
        start = time.perf_counter()
        use_model = prev.step > 0 and pseudo is not None
        classes = self.candidate_classes(pseudo, old_model if use_model else None)
        candidates = [*self.previous] + [
            Exemplar(int(i), self.source.names[int(i)], prev.step, c)
            for i, c in zip(self.indices, classes, strict=True)
        ]
        rng = np.random.default_rng([self.config.train.seed, self.info.step, 0x3E3])
        chosen = select_balanced(candidates, self.old_classes(), self.size, rng)
        log.info(
            f"step {self.info.step}: memory of {len(chosen)} images chosen from {len(candidates)} "
            f"candidates in {time.perf_counter() - start:.1f} s"
        )
        return chosen

    def choose_by_frequency(self) -> list[Exemplar]:
        """BalConpas's memory (:func:`~incseg.protocol.memory.select_by_frequency`), from the
        ground truth's class presence: step ``t - 1``'s images count the classes that step
        introduced; a previous memory image counts its own classes and, if it is one of step
        ``t - 1``'s images too, those (``memory_selection_sem.py:24-57``); the target counts every
        class over the images of the step that introduced it. No pass over images, no draw."""
        presence = self.source.presence()
        setting = self.config.setting
        counts = np.zeros(256)
        for step, indices in enumerate([*self.earlier, self.indices]):
            new = list(step_info(setting, step).new_classes)
            counts[new] += presence[np.asarray(indices, dtype=np.int64)][:, new].sum(axis=0)
        prev = self.previous_step
        new = np.array([c for c in prev.new_classes if c != 0], dtype=np.int64)

        def held(index: int) -> tuple[int, ...]:
            return tuple(int(c) for c in new[presence[index, new]])

        in_step = {int(i) for i in self.indices}
        previous = [
            replace(
                e,
                classes=tuple(sorted({*e.classes, *(held(e.index) if e.index in in_step else ())})),
            )
            for e in self.previous
        ]
        candidates = [
            Exemplar(int(i), self.source.names[int(i)], prev.step, held(int(i)))
            for i in self.indices
        ]
        old = len(prev.old_classes) if prev.step > 0 else 0
        seen = old + len(new)
        keep = int(self.size * old / seen) if self.previous else 0
        return select_by_frequency(previous, candidates, counts, keep, self.size)

    def old_classes(self) -> list[int]:
        return sorted(c for c in self.info.old_classes if c != 0)

    def write(self, path: Path, exemplars: list[Exemplar]) -> None:
        """``memory_step_K.json``: the step, one entry per image (id, source index, the step it
        came from, its classes, the class it was chosen for) and the entries' digest."""
        images = [e.to_dict() for e in exemplars]
        raw = {"step": self.info.step, "images": images, "sha256": _digest(images)}
        atomic_write(path, lambda f: f.write(json.dumps(raw, indent=1).encode()))

    def read(self, path: Path) -> list[Exemplar]:
        """The memory kept in ``path``, checked (:meth:`check`).

        Raises:
            DataError: naming the file and what is wrong with it; moving it away makes a resumed
                run choose the memory again.
        """
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
            exemplars = self.check(raw)
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError too
            raise DataError(
                f"{path}: not the exemplar memory of step {self.info.step} of this run ({err}); "
                f"move it away and resume to choose the memory again"
            ) from None
        return exemplars

    def check(self, raw: object) -> list[Exemplar]:
        """The exemplars of a memory file's content, each checked against the candidates: its
        image one of them (same index, same name, from the same step), none twice, :attr:`size`
        in all, its classes old ones, the class it was chosen for among them.

        Raises:
            ValueError: what is wrong, for :meth:`read`'s message.
        """
        if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
            raise _Malformed('expected {"step": K, "images": [...]}')
        if raw.get("step") != self.info.step:
            raise _Malformed(f"it is the memory of step {raw.get('step')!r}")
        images = raw["images"]
        if "sha256" in raw and raw["sha256"] != _digest(images):  # files of incseg <= 0.1 have none
            raise _Malformed("its entries were changed after incseg wrote them (digest mismatch)")
        exemplars = [_exemplar(entry, n) for n, entry in enumerate(images)]
        # A multiset: in overlap mode an image of the previous memory can be one of step t - 1's
        # images too, and then it is two candidates (one per step) that may both be chosen.
        left = Counter((e.index, e.name, e.step) for e in self.previous)
        prev = self.info.step - 1
        left.update((int(i), self.source.names[int(i)], prev) for i in self.indices)
        old = set(self.old_classes())
        for n, e in enumerate(exemplars):
            key = (e.index, e.name, e.step)
            if key not in left:
                raise _Malformed(f"entry {n} (index {e.index}, {e.name!r}) is not a candidate")
            if left[key] == 0:
                raise _Malformed(f"entry {n}: image {e.index} of step {e.step} is listed twice")
            turn_ok = e.chosen_for == 0 if self.rule == "frequency" else e.chosen_for in e.classes
            if not set(e.classes) <= old or not turn_ok:
                raise _Malformed(
                    f"entry {n}: classes {list(e.classes)} / {e.chosen_for} are not old ones"
                )
            left[key] -= 1
        if len(exemplars) != self.size:
            raise _Malformed(f"{len(exemplars)} images where method.memory_size is {self.size}")
        return exemplars


def _digest(images: list) -> str:
    return hashlib.sha256(json.dumps(images, sort_keys=True).encode()).hexdigest()


def _exemplar(entry: object, n: int) -> Exemplar:
    """An entry of a memory file, its fields of the right types (no ``"3"`` or ``3.5`` index)."""
    if not isinstance(entry, dict) or set(entry) != set(_FIELDS):
        raise _Malformed(f"entry {n}: expected the keys {sorted(_FIELDS)}")
    for key, kind in _FIELDS.items():
        value = entry[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _Malformed(f"entry {n}: {key} {value!r} is not a {kind.__name__}")
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in entry["classes"]):
        raise _Malformed(f"entry {n}: classes {entry['classes']!r} are not integers")
    return Exemplar.from_dict(entry)
