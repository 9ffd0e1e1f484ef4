"""The data loaders of a step: which images, which labels, which batches (docs/protocol.md,
"Image selection" and "Label remapping")."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from incseg.config import Config, DataConfig
from incseg.data import Source, StepDataset, build_source
from incseg.data.datasets import WithMemory
from incseg.data.query_transforms import query_test_transform, query_train_transform
from incseg.data.transforms import test_transform, train_transform
from incseg.engine.distributed import (
    SINGLE,
    DistInfo,
    EpochBatchSampler,
    HalfMemorySampler,
    barrier,
    shard_indices,
)
from incseg.errors import DataError
from incseg.protocol import StepInfo, make_lut, select_test, select_train
from incseg.protocol.official import official_split, select_listed, uses_official
from incseg.protocol.selection import pack_presence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Extras:
    """What a method adds to a step's training images (:class:`Sources.train_loader`).

    Attributes:
        unknown_from: which background pixels of the training images become unknown (254):
            ``"saliency"``, ``"background"`` or None (:class:`incseg.data.StepDataset`).
        memory: training-source indices of the step's memory images.
        memory_lut: their label lookup tables, ``(M, 256)`` in the order of ``memory`` (None:
            the step's training labels).
        mixing: ``concat``: memory images join the training images (DKD
            ``data_loaders.py:64-76``); ``half_batch``: they fill half of every batch
            (:class:`incseg.engine.distributed.HalfMemorySampler`, SSUL).
    """

    unknown_from: str | None = None
    memory: tuple[int, ...] = ()
    memory_lut: torch.Tensor | None = field(default=None, compare=False)
    mixing: Literal["concat", "half_batch"] = "concat"


NO_EXTRAS = Extras()


def step_seed(seed: int, step: int) -> int:
    """Seed of one step, so that a step's randomness does not depend on earlier steps' runs."""
    return seed * 1000 + step


def _selected(indices: np.ndarray, split: str, config: Config, info: StepInfo) -> np.ndarray:
    if len(indices) == 0:
        proto = config.protocol
        raise DataError(
            f"step {info.step} of {proto.setting} ({proto.mode}) selects no {split} images "
            f"(new classes {list(info.new_classes)}); the dataset is too small for this setting"
        )
    return indices


def train_indices(
    config: Config, source: Source, presence: np.ndarray, info: StepInfo
) -> np.ndarray:
    """Training images of a step: the official lists where ``protocol.split_source`` picks them
    (:mod:`incseg.protocol.official`), else the rule applied to the class-presence index."""
    proto = config.protocol
    setting = config.setting.name
    if not uses_official(config.data.dataset, setting, proto.mode, proto.split_source):
        return select_train(presence, info, proto.mode)
    listed = official_split(config.data.dataset, setting, proto.mode)[info.step]
    indices, absent = select_listed(source.names, listed)
    if absent:
        log.info(
            f"note: step {info.step}: {absent} of the {len(listed)} images of the official list "
            f"are not in {config.data.root}"
        )
    return indices


class TooFewImages(DataError):
    """A step's training images cannot make its batches; ``num_images``: how many were selected,
    the number the message gives (the plan, :mod:`incseg.engine.plan`, shows the same)."""

    def __init__(self, message: str, num_images: int) -> None:
        super().__init__(message)
        self.num_images = num_images


def check_batches(config: Config, info: StepInfo, num_images: int, dist: DistInfo) -> None:
    """Stop when step ``info``'s ``num_images`` training images cannot give every process a share
    of each batch, or give batch norm fewer than two values per channel.

    Raises:
        TooFewImages: the message names the step, the images and the batch.
    """
    if num_images < dist.world_size:
        raise TooFewImages(
            f"step {info.step} has {num_images} training images, fewer than the "
            f"{dist.world_size} processes",
            num_images,
        )
    # Batch norm in training needs two or more values per channel, and the ASPP pooling branch
    # has one per image: over the global batch with synchronised BN, else per process.
    cfg = config.train
    batch = min(cfg.batch_size, num_images)
    shared = dist.world_size > 1 and cfg.sync_bn
    if batch < 2 or (not shared and batch // dist.world_size < 2):
        raise TooFewImages(
            f"step {info.step}: {num_images} training image(s) and train.batch_size {cfg.batch_size} give "
            f"batches of {batch // (1 if shared else dist.world_size)} image(s) per process; batch norm "
            "needs 2 or more (use more images or a larger batch)",
            num_images,
        )


def build_train_loader(
    config: Config,
    source: Source,
    presence: np.ndarray,
    info: StepInfo,
    dist: DistInfo = SINGLE,
    extras: Extras = NO_EXTRAS,
) -> DataLoader:
    """Shuffled training loader of a step (images from :func:`train_indices`, with the method's
    :class:`Extras`), once :func:`check_batches` passes.

    Batches come from an :class:`EpochBatchSampler`: the order and each image's augmentation
    seed depend only on ``train.seed``, the step and the epoch (call ``set_epoch``), and under
    ``torchrun`` this rank gets its share of every global batch.
    """
    data, cfg, proto = config.data, config.train, config.protocol
    indices = _selected(train_indices(config, source, presence, info), "training", config, info)
    check_batches(config, info, len(indices), dist)
    lut = make_lut(info, "train", proto.labels)
    build = train_transform if data.pipeline == "mib" else query_train_transform
    transform = build(data.crop_size, (data.scale_min, data.scale_max))
    memory = np.asarray(extras.memory, dtype=np.int64)
    own_labels = extras.memory_lut is not None and len(memory) > 0
    if extras.mixing == "concat" and not own_labels:
        indices = np.concatenate([indices, memory])
    dataset = StepDataset(source, indices, lut, transform, unknown_from=extras.unknown_from)
    seed = step_seed(cfg.seed, info.step)
    if own_labels or (extras.mixing == "half_batch" and len(memory)):
        memory_lut = lut if extras.memory_lut is None else extras.memory_lut
        dataset = WithMemory(dataset, StepDataset(source, memory, memory_lut, transform))
    if extras.mixing == "half_batch" and len(memory):
        sampler = HalfMemorySampler(
            len(indices), len(memory), cfg.batch_size, seed, dist.rank, dist.world_size
        )
    else:  # concat: one shuffled stream over the step's images and the memory's
        sampler = EpochBatchSampler(len(dataset), cfg.batch_size, seed, dist.rank, dist.world_size)
    # The generator only seeds the workers (transforms are seeded per image); having one keeps
    # starting an epoch from drawing on the global RNG.
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=data.num_workers,
        generator=torch.Generator().manual_seed(0),
    )


def eval_transform(data: DataConfig) -> v2.Compose:
    """The test images' transform of ``data.pipeline``: MiB's resize and centre crop to
    ``test_crop`` (or the whole image), or the whole image at short side ``crop_size`` with its
    label at its size (Mask2Former's) or resized with it (CoMFormer's)."""
    if data.pipeline == "mib":
        return test_transform(data.test_crop)
    return query_test_transform(data.crop_size, resize_labels=data.pipeline == "comformer")


def build_test_loader(
    config: Config,
    source: Source,
    presence: np.ndarray,
    info: StepInfo,
    split: str = "test",
    dist: DistInfo = SINGLE,
) -> DataLoader:
    """Test loader of a step: images with a seen class, labels in the step's test convention.

    ``split="val"`` gives MiB's validation during training instead: test-split images with a
    class of the current step, old classes mapped to 255 (docs/protocol.md, "Label remapping"). Under ``torchrun``
    the loader holds this rank's shard (every N-th image, none repeated); ``evaluate`` sums the
    ranks' matrices.
    """
    proto = config.protocol
    ignore_zero = config.family == "ade" and proto.labels == "mib"
    if split == "test":
        chosen = select_test(presence, info, proto.mode if proto.test_selection == "mode" else None)
    else:
        chosen = select_train(presence, info, "overlap")
    indices = _selected(chosen, split, config, info)
    lut = make_lut(info, split, proto.labels, ignore_zero_at_test=ignore_zero)
    dataset = StepDataset(source, indices, lut, eval_transform(config.data))
    # Full images of different sizes cannot share a batch; padding would change the ASPP's
    # image-level pooling (Mask2Former's too: the official tests one image per batch), so they
    # are evaluated one at a time.
    same_size = config.data.test_crop is not None or getattr(source, "fixed_size", True)
    batch = config.train.eval_batch_size if same_size else 1
    # An own generator: starting this loader must not draw from the global RNG that drives the
    # training augmentations, so validating leaves training unchanged.
    return DataLoader(
        dataset,
        batch_size=batch,
        num_workers=config.data.num_workers,
        sampler=shard_indices(len(dataset), dist.rank, dist.world_size),
        generator=torch.Generator().manual_seed(0),
    )


@dataclass(frozen=True)
class Sources:
    """The train and test images of a run and their packed class-presence indexes, built (or read
    from the cache) once; every step's loaders select from them, for ``config`` in process
    ``dist``."""

    config: Config
    dist: DistInfo
    train: Source
    test: Source
    train_presence: np.ndarray
    test_presence: np.ndarray
    # A step's loaders, built once: the plan (engine/plan.py) and the run share them, so the
    # selection (and its notes) happens once per step.
    _loaders: dict[tuple, DataLoader] = field(default_factory=dict, repr=False, compare=False)

    def for_config(self, config: Config) -> Sources:
        """The same images for another config that reads the same data (``config.data``), with
        loaders of its own: a comparison's plan loads the images once for all its runs."""
        if config.data != self.config.data:
            raise ValueError("for_config: the configs read different data")
        return replace(self, config=config, _loaders={})

    @classmethod
    def load(cls, config: Config, dist: DistInfo = SINGLE, *, progress: bool = False) -> Sources:
        """Data problems surface here, before anything is written. Rank 0 builds the class index
        (and its cache) first; the other ranks then read the cache."""
        if not dist.is_main:
            barrier(dist)
        train = build_source(config.data, "train", progress=progress)
        test = build_source(config.data, "test", progress=progress)
        if dist.is_main:
            barrier(dist)
        presence = pack_presence(train.presence()), pack_presence(test.presence())
        return cls(config, dist, train, test, *presence)

    def train_loader(self, info: StepInfo, extras: Extras = NO_EXTRAS) -> DataLoader:
        key = ("train", info.step, extras)
        if key not in self._loaders:
            self._loaders[key] = build_train_loader(
                self.config, self.train, self.train_presence, info, self.dist, extras
            )
        return self._loaders[key]

    def train_indices(self, info: StepInfo) -> np.ndarray:
        """The training images of step ``info`` (positions in :attr:`train`), as its loader
        without extras (the plan's, cached) selected them: selected once, noted once."""
        return self.train_loader(info).dataset.indices

    def test_loader(self, info: StepInfo, split: str = "test") -> DataLoader:
        key = (split, info.step)
        if key not in self._loaders:
            self._loaders[key] = build_test_loader(
                self.config, self.test, self.test_presence, info, split, self.dist
            )
        return self._loaders[key]
