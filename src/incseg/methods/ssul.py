"""SSUL and SSUL-M (Cha et al., "SSUL: Semantic Segmentation with Unknown Label for Exemplar-based
Class-Incremental Learning", NeurIPS 2021), as the official code computes them (clovaai/SSUL at
e08ee9c; ``file:line`` below are in that repository). docs/methods.md, ``ssul``.

Model: ``model.architecture: ssul`` (:mod:`incseg.models.heads`): sigmoid heads ``[unknown,
background, class 1, ...]``, one head per step.

Labels (incseg's channel ``k`` is SSUL's channel ``k + 1``):

- training images: the step's labels shifted by one, the unknown (channel 0) where the loader
  marked a background pixel 254 (salient, ``datasets/voc.py:135-141``; every background pixel on
  ADE20K, ``datasets/ade.py:291-298``); void stays void (``protocol.labels: ssul``);
- steps > 0: where the label is unknown or background and the old model's highest sigmoid is an
  old object class with at least ``pseudo_threshold``, that class (``main.py:451-466``);
- memory images (SSUL-M): the official code gives them *unshifted* labels, all classes seen so far
  (``voc.py:76-89, 135``: only the ``train`` split is shifted), so their background supervises
  the unknown channel and class ``c`` the channel of the class before it; ``memory_labels:
  unshifted`` keeps that (default, the published numbers), ``shifted`` gives them the training
  layout with the unknown on their background (the fix of the RogerQi/SSUL_fix fork, ccba9df).

Loss: binary cross-entropy on every channel, summed over channels, mean over non-void pixels
(``utils/loss.py:24-56``). Steps > 0: only the new head, the unknown head and the background head
train (the background's LR times ``background_lr_scale``, ``main.py:241-260``); every batch norm
keeps its statistics and affine parameters (``network/utils.py:21-30``); the new head starts as a
copy of the unknown head (``main.py:304-325``). Step 0 trains everything, the head and classifiers
at ten times the backbone's LR (``main.py:262-264``). Memory: ``memory_size`` images in total,
half of every batch (``main.py:429-443``), chosen class-balanced (:mod:`incseg.protocol.memory`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from incseg.methods.base import Method
from incseg.protocol.choices import IGNORE_INDEX, UNKNOWN_INDEX
from incseg.protocol.steps import StepInfo
from incseg.ranges import Range, ranged

if TYPE_CHECKING:
    from incseg.models.segmenter import SegmenterOutput
    from incseg.protocol.memory import Exemplar

MEMORY_SIZE = Range(
    0, 100_000, "exemplar images kept in total (0: none; 100 VOC / 300 ADE20K for -M)"
)
PROBABILITY = Range(0, 1, "a sigmoid probability")
# The memory selection's pseudo-label threshold is fixed (utils/memory.py:71), not --pseudo_thresh.
MEMORY_THRESHOLD = 0.7


def shift_labels(targets: torch.Tensor) -> torch.Tensor:
    """incseg training labels -> SSUL's channels: ``(B, H, W)`` with 0 = background, ``k`` = the
    step's channel ``k``, 254 = unknown, 255 = void -> int64 with 0 = unknown, 1 = background,
    ``k + 1``, 255 (``datasets/voc.py:135-141``)."""
    t = targets.long()
    shifted = torch.where(t == IGNORE_INDEX, IGNORE_INDEX, t + 1)
    return shifted.masked_fill(t == UNKNOWN_INDEX, 0)


def pseudo_labels(labels: torch.Tensor, old_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """SSUL's pseudo-labels (``main.py:451-466``): where ``labels`` is unknown (0) or background
    (1) and the old model's highest sigmoid over all its channels is an object class (> 1) with a
    probability of at least ``threshold``, that class.

    Args:
        labels: ``(B, H, W)`` int64 in SSUL's channels (:func:`shift_labels`).
        old_logits: ``(B, O, H, W)`` the old model's logits, same channel layout.
    """
    score, pred = torch.sigmoid(old_logits.float()).max(1)
    fill = (labels <= 1) & (pred > 1) & (score >= threshold)
    return torch.where(fill, pred, labels)


def bce_all_channels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``BCEWithLogitsLossWithIgnoreIndex`` (``utils/loss.py:24-56``): one-hot targets over all
    ``C`` channels, BCE summed over channels, mean over the pixels that are not 255.

    Computed as ``sum_c softplus(z_c) - z_label`` per pixel (the one-hot BCE's sum, without the
    ``(B, C, H, W)`` target). No valid pixel: 0 (the official mean over none is NaN); the
    sum over valid pixels divided by their count (at least 1) needs no read-back to the host.

    Args:
        logits: ``(B, C, H, W)``.
        labels: ``(B, H, W)`` int64 channel indices, 255 = void.
    """
    valid = labels != IGNORE_INDEX
    z = logits.float()
    picked = z.gather(1, labels.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    per_pixel = (F.softplus(z).sum(1) - picked) * valid
    return per_pixel.sum() / valid.sum().clamp(min=1)


def transfer_unknown(model: nn.Module) -> None:
    """The new head starts as the unknown head (``main.py:304-325``): its 3x3 conv, its batch
    norm (affine parameters and running statistics), and every output row of its 1x1 conv (weight
    and bias) the unknown's single row."""
    unknown, new = model.classifiers[0].unknown, model.classifiers[-1]
    with torch.no_grad():
        new[0].weight.copy_(unknown[0].weight)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new[1], name).copy_(getattr(unknown[1], name))
        new[3].weight.copy_(unknown[3].weight.expand_as(new[3].weight))
        new[3].bias.copy_(unknown[3].bias.expand_as(new[3].bias))


@dataclass
class SSUL(Method):
    """SSUL / SSUL-M (module docstring).

    Attributes:
        memory_size: exemplar images in total (0: SSUL; 100 VOC / 300 ADE20K: SSUL-M).
        pseudo_threshold: the old model's probability above which unknown / background pixels
            take its class (0.7).
        unknown: ``saliency`` (VOC: salient background, ``data.saliency``) or ``background``
            (ADE20K: every background pixel) becomes the unknown class.
        memory_labels: ``unshifted`` (official) or ``shifted`` (module docstring).
        background_lr_scale: the background head's LR factor at steps > 0 (1e-4).
        classifier_lr_scale: the head's and classifiers' LR factor at step 0 (10).
    """

    architecture: ClassVar[str] = "ssul"
    needs_old_model: ClassVar[bool] = True
    # The -M variant's memory on VOC (``incseg compare --methods NAME-m``).
    memory_variant: ClassVar[int] = 100
    memory_mixing: ClassVar[str] = "half_batch"

    memory_size: int = ranged(0, MEMORY_SIZE)
    pseudo_threshold: float = ranged(0.7, PROBABILITY)
    unknown: Literal["saliency", "background"] = "saliency"
    memory_labels: Literal["unshifted", "shifted"] = "unshifted"
    background_lr_scale: float = ranged(1e-4, Range(0, 1000, "LR factor"))
    classifier_lr_scale: float = ranged(10.0, Range(0, 1000, "LR factor"))

    @property
    def unknown_from(self) -> str:
        return self.unknown

    def init_new_classifier(self, model: nn.Module, info: StepInfo) -> None:
        transfer_unknown(model)

    def trained_heads(self, model: nn.Module) -> list[nn.Module]:
        """The heads a step > 0 trains: the new one, the unknown, the background."""
        first = model.classifiers[0]
        return [model.classifiers[-1], first.unknown, first.background]

    def begin_step(self, info: StepInfo, model: nn.Module) -> None:
        model.frozen_norm = info.step > 0  # --bn_freeze acts at steps > 0 (main.py:183)
        if info.step == 0:
            model.requires_grad_(True)
            return
        model.requires_grad_(False)
        for head in self.trained_heads(model):
            for m in head.modules():
                if isinstance(m, nn.Conv2d):
                    m.requires_grad_(True)

    def param_groups(self, model: nn.Module, info: StepInfo) -> list[dict]:
        if info.step == 0:
            rest = [*model.head.parameters(), *model.classifiers.parameters()]
            return [
                {"params": list(model.backbone.parameters())},
                {"params": rest, "lr_scale": self.classifier_lr_scale},
            ]
        new, unknown, background = (
            [p for p in head.parameters() if p.requires_grad] for head in self.trained_heads(model)
        )
        return [
            {"params": new},
            {"params": unknown},
            {"params": background, "lr_scale": self.background_lr_scale},
        ]

    def relabel(
        self, old_output: SegmenterOutput | None, targets: torch.Tensor, info: StepInfo
    ) -> torch.Tensor:
        labels = shift_labels(targets)
        if old_output is None:
            return labels
        return pseudo_labels(labels, old_output.logits, self.pseudo_threshold)

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        return {"bce": bce_all_channels(output.logits, targets)}

    def memory_lut(self, info: StepInfo, exemplar: Exemplar | None = None) -> torch.Tensor:
        """Memory labels (module docstring), in incseg's training values that :func:`shift_labels`
        turns into SSUL's channels: ``unshifted``: background and future classes 254 (-> the
        unknown), the class of channel ``k`` ``k - 1`` (-> SSUL channel ``k``, that of the class
        before it); ``shifted``: the class of channel ``k`` ``k``, everything else 254. The same
        for every image."""
        lut = torch.full((256,), UNKNOWN_INDEX, dtype=torch.uint8)
        lut[IGNORE_INDEX] = IGNORE_INDEX
        offset = 1 if self.memory_labels == "unshifted" else 0
        for k, c in enumerate(info.order):
            if k > 0:
                lut[c] = k - offset
        return lut

    def memory_pseudo_labels(
        self, old_output: SegmenterOutput, targets: torch.Tensor, info: StepInfo
    ) -> torch.Tensor:
        """The selection's labels of step ``info``'s images (``utils/memory.py:62-78``): background
        pixels where the model's highest sigmoid is an object class with probability >= 0.7
        take that class (in incseg's channels)."""
        labels = pseudo_labels(shift_labels(targets), old_output.logits, MEMORY_THRESHOLD)
        objects = (labels >= 2) & (labels != IGNORE_INDEX)
        return torch.where(objects, labels - 1, targets)
