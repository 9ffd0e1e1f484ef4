"""Backbone + ASPP head + one 1x1 classifier per step (the MiB model, docs/protocol.md "Model").
Built from names by :func:`incseg.models.build.build_segmenter`."""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from incseg.models.choices import FEATURE_NAMES
from incseg.models.deeplab import ASPP

STAGES = FEATURE_NAMES[:8]  # before the activation, then activated


class SegmenterOutput(NamedTuple):
    """``logits``: ``(B, C_t, H, W)`` at input size; ``features``: the maps asked for by name
    (:data:`FEATURE_NAMES`), an empty dict when none were."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor]


class IncrementalSegmenter(nn.Module):
    """DeepLabV3 whose classifier grows by one 1x1 conv per step.

    Args:
        backbone: module with ``out_channels``.
        head_channels: ASPP output channels (256 in the paper).
        channels_per_step: classifier outputs of steps 0..t (step 0 includes background).
        rates: ASPP dilation rates.
        norm: ``"bn"`` or ``"iabn"``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head_channels: int,
        channels_per_step: tuple[int, ...],
        rates: tuple[int, ...],
        norm: str,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = self.make_head(backbone.out_channels, head_channels, rates, norm)
        self.head_channels = head_channels
        self.classifiers = nn.ModuleList()
        for num in channels_per_step:
            self.add_classifier(num)

    @property
    def channels_per_step(self) -> tuple[int, ...]:
        return tuple(c.out_channels for c in self.classifiers)

    @property
    def num_channels(self) -> int:
        return sum(self.channels_per_step)

    def make_head(self, in_channels: int, out_channels: int, rates, norm: str) -> nn.Module:
        """The head between backbone and classifiers: MiB's ASPP."""
        return ASPP(in_channels, out_channels, rates, norm)

    def make_classifier(self, num_channels: int) -> nn.Module:
        """A step's classifier: a ``head_channels -> num_channels`` 1x1 conv (PyTorch default
        init). Its ``out_channels`` is the number of the step's class channels."""
        return nn.Conv2d(self.head_channels, num_channels, 1)

    def add_classifier(self, num_channels: int) -> nn.Module:
        """Append the next step's classifier (:meth:`make_classifier`) on the model's device."""
        ref = next(self.head.parameters())
        classifier = self.make_classifier(num_channels).to(device=ref.device, dtype=ref.dtype)
        self.classifiers.append(classifier)
        return classifier

    @staticmethod
    def scores(logits: torch.Tensor) -> torch.Tensor:
        """``(B, *, H, W)`` logits -> ``(B, C_t, H, W)`` scores whose argmax over channels (first
        on ties) is the prediction, channel ``k`` for class ``order[k]``: the logits themselves
        here (softmax layouts); sigmoid layouts override it (:mod:`incseg.models.heads`)."""
        return logits

    def prediction_scores(self, output: SegmenterOutput) -> torch.Tensor:
        """The scores of a forward pass's output that evaluation and prediction take the argmax
        of: :meth:`scores` of its logits (the query-based model reads more of its output)."""
        return self.scores(output.logits)

    def forward(self, images: torch.Tensor, features: Collection[str] = ()) -> SegmenterOutput:
        """``(B, 3, H, W)`` normalised images -> logits ``(B, C_t, H, W)`` (channel order = steps)
        and the intermediate maps named in ``features`` (:data:`FEATURE_NAMES`). Without names the
        plain path runs: nothing extra is computed or kept."""
        if any(name in STAGES for name in features):
            body, pre, out = self.backbone.forward_stages(images)
            stages = [*pre, *out]
        else:
            body, stages = self.backbone(images), []
        head = self.head(body)
        small = torch.cat([cls(head) for cls in self.classifiers], dim=1)
        logits = F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)
        if not features:
            return SegmenterOutput(logits, {})
        maps = dict(zip(STAGES, stages)) | {"body": body, "head": head, "logits_small": small}
        unknown = set(features) - set(maps) - set(STAGES)
        if unknown:
            raise ValueError(
                f"unknown feature names {sorted(unknown)}; valid: {list(FEATURE_NAMES)}"
            )
        return SegmenterOutput(logits, {name: maps[name] for name in features})
