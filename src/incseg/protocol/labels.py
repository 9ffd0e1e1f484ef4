"""Label remapping at step t by a 256-entry lookup table (docs/protocol.md, "Label remapping").

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

``val`` is the validation during training, in the run's convention. MiB: like ``test`` but old
classes are 255 (MiB ``dataset/voc.py:142-156``: outside training ``masking_value = 255`` and only
``labels + [255]`` keep their channel). PLOP: old classes are 0, so ``val`` equals PLOP's ``train``
(PLOP ``run.py:107-118`` builds the validation set with ``masking=not opts.no_mask`` and
``data_masking=opts.data_masking``, default ``"current"`` in ``argparser.py:382-387``;
``dataset/voc.py:182-207`` then maps every value outside ``[0] + labels + [255]``, old classes
included, to ``masking_value = 0``, and 255 stays 255).
``ssul``: PLOP's training labels (void stays 255: clovaai/SSUL ``datasets/voc.py:69-70,
149-156`` keep ``255`` among the step's target classes) and MiB's test labels (SSUL's metric
drops ground truth at or above the number of seen classes, i.e. future classes and 255,
``metrics/stream_metrics.py:84``); validation as MiB's.
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
        split: ``"train"``, ``"test"`` or ``"val"`` (validation during training: old classes are
            255 under ``"mib"`` and 0 under ``"plop"``, see the module docstring).
        convention: ``"mib"`` (default, the MiB paper), ``"plop"`` (PLOP / cssegmentation) or
            ``"ssul"`` (SSUL: PLOP's training, MiB's test labels).
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
        fill, void = (0 if convention == "plop" else IGNORE_INDEX), IGNORE_INDEX
        convention = "mib" if convention == "ssul" else convention
    # `fill` covers every value not listed below: future classes and values outside the setting.
    lut = torch.full((256,), fill, dtype=torch.uint8)
    lut[IGNORE_INDEX] = void
    idx = {c: k for k, c in enumerate(info.order)}
    for c in info.new_classes:
        lut[c] = idx[c]
    for c in info.old_classes:
        if split == "test":
            lut[c] = idx[c]
        elif split == "val" and convention == "mib":
            lut[c] = IGNORE_INDEX
        else:  # training, and PLOP's validation: old classes are background
            lut[c] = 0
    lut[0] = IGNORE_INDEX if (ignore_zero_at_test and not train) else 0
    return lut


def remap(label: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Apply a lookup table: ``(..., H, W)`` integer label -> same shape, ``lut.dtype``.

    One ``index_select`` with int32 indices: about 3x faster on the CPU than advanced indexing,
    which widens the label to int64 first; the same call runs on any device without a sync.
    """
    return lut.index_select(0, label.reshape(-1).to(torch.int32)).reshape(label.shape)
