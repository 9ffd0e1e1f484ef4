"""Which images belong to a step, from a per-image class-presence index (docs/protocol.md,
"Which training images belong to step t").

The index is a boolean matrix ``presence`` of shape ``(num_images, 256)``: ``presence[i, c]`` is
True when label value ``c`` occurs in image ``i``. It is computed once per dataset (one pass over
the labels) and every setting, mode and step is then selected from it with vectorised NumPy.
:func:`pack_presence` turns it into four 64-bit words per image, so that a selection is a few
bitwise operations per image; the selection functions accept either form.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from incseg.errors import ConfigError
from incseg.protocol.choices import MODES
from incseg.protocol.steps import StepInfo

NUM_LABEL_VALUES = 256  # labels are uint8; 255 = ignore


def label_presence(label: np.ndarray | torch.Tensor) -> np.ndarray:
    """Presence vector of one label map.

    Args:
        label: integer label map of any shape, values in 0..255.

    Returns:
        ``(256,)`` bool array, True for every value that occurs.
    """
    flat = torch.as_tensor(label).reshape(-1).long()
    return (torch.bincount(flat, minlength=NUM_LABEL_VALUES) > 0).numpy()


def build_presence(labels: Iterable[np.ndarray | torch.Tensor]) -> np.ndarray:
    """Stack :func:`label_presence` over labels into a ``(N, 256)`` bool matrix."""
    rows = [label_presence(label) for label in labels]
    if not rows:
        return np.zeros((0, NUM_LABEL_VALUES), dtype=bool)
    return np.stack(rows)


def pack_presence(presence: np.ndarray) -> np.ndarray:
    """``(N, 256)`` bool -> ``(N, 4)`` uint64 bit sets (bit ``c % 64`` of word ``c // 64``)."""
    if presence.dtype == np.uint64:
        return presence
    packed = np.packbits(presence.astype(bool, copy=False), axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8")


def _mask(classes: Iterable[int]) -> np.ndarray:
    """``(4,)`` uint64 bit set of ``classes``."""
    mask = np.zeros((1, NUM_LABEL_VALUES), dtype=bool)
    mask[0, list(classes)] = True
    return pack_presence(mask)[0]


def _any(words: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per image: does its bit set meet ``mask``?"""
    return (words & mask).any(axis=1)


def select_train(presence: np.ndarray, info: StepInfo, mode: str) -> np.ndarray:
    """Indices of the training images of a step.

    With C = classes present in an image (0 and 255 excluded):

    * ``overlap``: keep the image if C contains a new class.
    * ``disjoint``: keep it if C contains a new class and no future class. Classes outside the
      setting (none for the shipped settings) also exclude the image.

    Args:
        presence: ``(N, 256)`` bool class-presence index, or its :func:`pack_presence` form.
        info: the step.
        mode: ``"disjoint"`` or ``"overlap"``.

    Returns:
        Sorted ``int64`` indices into the index rows.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; expected one of {list(MODES)}")
    words = pack_presence(presence)
    keep = _any(words, _mask(info.new_classes))
    if mode == "disjoint":
        keep &= ~_any(words, ~_mask((0, 255, *info.old_classes, *info.new_classes)))
    return np.flatnonzero(keep).astype(np.int64)


def select_test(presence: np.ndarray, info: StepInfo, mode: str | None = None) -> np.ndarray:
    """Indices of the test images of a step.

    Default (``protocol.test_selection: seen``, docs/protocol.md): images with at least one seen
    class (0 excluded). With ``mode="disjoint"`` (``test_selection: mode``), images with a class
    not seen yet are dropped too: cssegmentation filters its test set with the training rule,
    every seen class counting as new (``csseg/modules/datasets/base.py:115-127, 147-167``);
    under ``overlap`` that rule is the default selection.
    """
    words = pack_presence(presence)
    keep = _any(words, _mask(info.seen_classes))
    if mode == "disjoint":
        keep &= ~_any(words, ~_mask((0, 255, *info.seen_classes)))
    return np.flatnonzero(keep).astype(np.int64)
