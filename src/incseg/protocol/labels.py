"""Label remapping at step t by a 256-entry lookup table (SPEC section 4).

Dataset labels hold original class ids (0 = background, 255 = void). The model's channel ``k`` is
dataset class ``order[k]`` with ``order = [0] + old + new``. A remapped label holds channel indices,
0 for background and 255 for pixels the loss or the metric must ignore.

Two conventions exist (``train`` / ``test`` columns):

============== ====== ====== ====== =======
pixel          MiB tr MiB te PLOP tr PLOP te
============== ====== ====== ====== =======
0              0      0      0       0
old class      0      idx    0       idx
new class      idx    idx    idx     idx
future class   0      255    0       0
255 (void)     0      255    255     255
============== ====== ====== ====== =======

``val`` is MiB's validation during training: like ``test`` but old classes are 255.
For ADE20K, class 0 ("other") is trained as background and, with ``ignore_zero_at_test``
(MiB), ignored (255) at test.
"""

from __future__ import annotations

import torch

from incseg.errors import ConfigError
from incseg.protocol.choices import CONVENTIONS, IGNORE_INDEX
from incseg.protocol.steps import StepInfo

SPLITS = ("train", "test", "val")


def make_lut(
    info: StepInfo,
    split: str,
    convention: str = "mib",
    *,
    ignore_zero_at_test: bool = False,
) -> torch.Tensor:
    """Lookup table mapping dataset label values to training / evaluation targets.

    Args:
        info: the step.
        split: ``"train"``, ``"test"`` or ``"val"``.
        convention: ``"mib"`` (default, the MiB paper) or ``"plop"`` (PLOP / cssegmentation).
        ignore_zero_at_test: map class 0 to 255 outside training (ADE20K under MiB).

    Returns:
        ``(256,)`` uint8 tensor ``lut``; the remapped label is ``lut[label.long()]``.
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"unknown label convention {convention!r}; expected one of {CONVENTIONS}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
    train = split == "train"
    if train:
        fill, void = 0, (0 if convention == "mib" else IGNORE_INDEX)
    else:
        fill, void = (IGNORE_INDEX if convention == "mib" else 0), IGNORE_INDEX
    # `fill` covers every value not listed below: future classes and values outside the setting.
    lut = torch.full((256,), fill, dtype=torch.uint8)
    lut[IGNORE_INDEX] = void
    idx = {c: k for k, c in enumerate(info.order)}
    for c in info.new_classes:
        lut[c] = idx[c]
    for c in info.old_classes:
        lut[c] = 0 if train else (IGNORE_INDEX if split == "val" else idx[c])
    lut[0] = IGNORE_INDEX if (ignore_zero_at_test and not train) else 0
    return lut


def remap(label: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Apply a lookup table: ``(..., H, W)`` integer label -> same shape, ``lut.dtype``.

    One ``index_select`` with int32 indices: about 3x faster on the CPU than advanced indexing,
    which widens the label to int64 first; the same call runs on any device without a sync.
    """
    return lut.index_select(0, label.reshape(-1).to(torch.int32)).reshape(label.shape)
