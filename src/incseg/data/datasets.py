"""A dataset *source* (all images of a split) seen through one step: selected images, remapped labels."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from incseg.data.transforms import apply_pair
from incseg.protocol.choices import UNKNOWN_INDEX
from incseg.protocol.labels import remap


class Source(Protocol):
    """All image / label pairs of one split of a dataset."""

    names: list[str]

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(3, H, W)`` uint8 image and ``(H, W)`` uint8 label with original class ids."""
        ...

    def saliency(self, index: int) -> torch.Tensor:
        """``(H, W)`` uint8 saliency map of image ``index`` (> 0: salient)."""
        ...

    def presence(self) -> np.ndarray:
        """``(N, 256)`` bool class-presence index."""
        ...


class StepDataset(Dataset):
    """Images ``indices`` of ``source`` with labels remapped by ``lut`` after ``transform``:
    one ``(256,)`` table, or ``(len(indices), 256)``, one per image (BalConpas's memory keeps
    each image's own classes).

    Items are ``(image, label)``: float32 ``(3, h, w)`` normalised image and uint8 ``(h, w)``
    channel-index label (255 = ignore). Remapping is one lookup-table gather per label.

    With ``unknown_from="saliency"`` each image's saliency map goes through the same geometric
    transform as its label, and a pixel that is background (0) after remapping and salient
    (> 0) becomes :data:`~incseg.protocol.choices.UNKNOWN_INDEX` (254), SSUL's unknown class
    (clovaai/SSUL ``datasets/voc.py:135-141``: after augmentation, nearest resampling); with
    ``"background"`` every background pixel does (SSUL on ADE20K, ``datasets/ade.py:291-298``).

    A key is an item number or ``(item, seed)``: with a seed, the random transforms draw from a
    generator seeded with it (the global RNG is left as it was), so an image's augmentation does
    not depend on the number of loader workers or processes (see ``EpochBatchSampler``).
    """

    def __init__(
        self,
        source: Source,
        indices: np.ndarray,
        lut: torch.Tensor,
        transform: v2.Transform,
        *,
        unknown_from: str | None = None,
    ) -> None:
        self.source = source
        self.unknown_from = unknown_from
        self.indices = np.asarray(indices, dtype=np.int64)
        if lut.ndim == 2 and len(lut) != len(self.indices):
            raise ValueError(f"{len(lut)} lookup tables for {len(self.indices)} images")
        self.lut = lut
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        item, seed = key if isinstance(key, tuple) else (key, None)
        index = int(self.indices[item])
        image, label = self.source.load(index)
        if (
            self.unknown_from == "saliency"
        ):  # one (2, H, W) mask: the same crop, flip and resampling
            label = torch.stack([label, self.source.saliency(index)])
        if seed is None:
            image, label = apply_pair(self.transform, image, label)
        else:
            # torchvision's v2 transforms draw from the global RNG; fork it for this one image.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image, label = apply_pair(self.transform, image, label)
        lut = self.lut if self.lut.ndim == 1 else self.lut[item]
        if self.unknown_from is None:
            return image, remap(label, lut)
        if self.unknown_from == "background":
            label = remap(label, lut)
            return image, label.masked_fill(label == 0, UNKNOWN_INDEX)
        label, salient = remap(label[0], lut), label[1] > 0
        return image, label.masked_fill((label == 0) & salient, UNKNOWN_INDEX)


class WithMemory(Dataset):
    """A step's training images followed by its memory images, each with its own labels: key
    ``(item, seed)`` with ``item < len(train)`` is a training image, else memory image
    ``item - len(train)`` (:class:`incseg.engine.distributed.HalfMemorySampler` draws both)."""

    def __init__(self, train: StepDataset, memory: StepDataset) -> None:
        self.train, self.memory = train, memory

    def __len__(self) -> int:
        return len(self.train) + len(self.memory)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        item, seed = key if isinstance(key, tuple) else (key, None)
        part, item = (
            (self.train, item)
            if item < len(self.train)
            else (
                self.memory,
                item - len(self.train),
            )
        )
        return part[item if seed is None else (item, seed)]
