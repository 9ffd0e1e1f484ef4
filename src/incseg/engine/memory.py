"""A step's exemplar memory (:mod:`incseg.protocol.memory`): each candidate's classes, the
selection, and the file that keeps it in the run directory (``memory_step_K.json``; the step
checkpoint holds a copy for the next step and for runs started from it).

The candidates' classes come from one pass over step ``t - 1``'s training images, resized and
centre-cropped to ``data.crop_size`` (SSUL ``utils/memory.py:23-42``), with the labels of step
``t - 1`` (old classes are background there); from step 2 on, the method may fill that background
with the old model's confident predictions (:meth:`~incseg.methods.base.Method.
memory_pseudo_labels`; SSUL ``memory.py:62-78``, DKD ``memory.py:95-105``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from incseg.config import Config
from incseg.data import Source, StepDataset
from incseg.data.transforms import test_transform
from incseg.engine.checkpoint import atomic_write
from incseg.engine.runtime import Runtime
from incseg.protocol import StepInfo, get_setting, make_lut, step_info
from incseg.protocol.memory import Exemplar, select_balanced

log = logging.getLogger(__name__)


@torch.no_grad()
def candidate_classes(
    config: Config,
    source: Source,
    indices: np.ndarray,
    info: StepInfo,
    rt: Runtime,
    pseudo: Callable | None = None,
    model: nn.Module | None = None,
) -> list[tuple[int, ...]]:
    """The dataset classes (background and void excluded) of each image ``indices`` of step
    ``info`` as the memory selection sees them (module docstring); with ``model`` the labels are
    first passed through ``pseudo(model_output, labels, info)``."""
    lut = make_lut(info, "train", config.protocol.labels)
    dataset = StepDataset(source, indices, lut, test_transform(config.data.crop_size))
    loader = DataLoader(
        dataset, batch_size=config.train.eval_batch_size, num_workers=config.data.num_workers
    )
    order = torch.tensor(info.order)
    found = []
    for images, labels in loader:
        labels = labels.to(rt.device).long()
        if model is not None:
            images = images.to(rt.device, memory_format=rt.memory_format)
            with rt.autocast():
                labels = pseudo(model(images), labels, info)
        for label in labels:
            values = label.unique().cpu()
            values = values[(values > 0) & (values < len(order))]
            found.append(tuple(order[values].tolist()))
    return found


def select_memory(
    config: Config,
    source: Source,
    previous: list[Exemplar],
    indices: np.ndarray,
    info: StepInfo,
    size: int,
    rt: Runtime,
    pseudo: Callable | None = None,
    old_model: nn.Module | None = None,
) -> list[Exemplar]:
    """The memory of step ``info.step`` (>= 1): ``previous`` (step ``t - 1``'s memory) and step
    ``t - 1``'s training images ``indices`` as candidates, ``size`` taken. The draws come from
    a generator seeded by ``train.seed`` and the step, so the same run chooses the same images."""
    prev = step_info(get_setting(config.family, config.protocol.setting), info.step - 1)
    use_model = prev.step > 0 and pseudo is not None
    start = time.perf_counter()
    classes = candidate_classes(
        config, source, indices, prev, rt, pseudo, old_model if use_model else None
    )
    candidates = [*previous] + [
        Exemplar(int(i), source.names[int(i)], prev.step, c)
        for i, c in zip(indices, classes, strict=True)
    ]
    rng = np.random.default_rng([config.train.seed, info.step, 0x3E3])
    old = [c for c in info.old_classes if c != 0]
    chosen = select_balanced(candidates, sorted(old), size, rng)
    log.info(
        f"step {info.step}: memory of {len(chosen)} images chosen from {len(candidates)} "
        f"candidates in {time.perf_counter() - start:.1f} s"
    )
    return chosen


def write_memory(path, step: int, exemplars: list[Exemplar]) -> None:
    """``memory_step_K.json``: the step, then one entry per image (id, source index, the step it
    came from, its classes, the class it was chosen for)."""
    text = json.dumps({"step": step, "images": [e.to_dict() for e in exemplars]}, indent=1)
    atomic_write(path, lambda f: f.write(text.encode()))


def read_memory(path) -> list[Exemplar]:
    raw = json.loads(path.read_text())
    return [Exemplar.from_dict(entry) for entry in raw["images"]]
