"""A dataset *source* (all images of a split) seen through one step: selected images, remapped labels."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from incseg.data.transforms import apply_pair
from incseg.protocol.labels import remap


class Source(Protocol):
    """All image / label pairs of one split of a dataset."""

    names: list[str]

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(3, H, W)`` uint8 image and ``(H, W)`` uint8 label with original class ids."""
        ...

    def presence(self) -> np.ndarray:
        """``(N, 256)`` bool class-presence index."""
        ...


class StepDataset(Dataset):
    """Images ``indices`` of ``source`` with labels remapped by ``lut`` after ``transform``.

    Items are ``(image, label)``: float32 ``(3, h, w)`` normalised image and uint8 ``(h, w)``
    channel-index label (255 = ignore). Remapping is one lookup-table gather per label.

    A key is an item number or ``(item, seed)``: with a seed, the random transforms draw from a
    generator seeded with it (the global RNG is left as it was), so an image's augmentation does
    not depend on the number of loader workers or processes (see ``EpochBatchSampler``).
    """

    def __init__(
        self, source: Source, indices: np.ndarray, lut: torch.Tensor, transform: v2.Transform
    ) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.lut = lut
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        item, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.source.load(int(self.indices[item]))
        if seed is None:
            image, label = apply_pair(self.transform, image, label)
        else:
            # torchvision's v2 transforms draw from the global RNG; fork it for this one image.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image, label = apply_pair(self.transform, image, label)
        return image, remap(label, self.lut)
