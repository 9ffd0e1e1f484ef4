"""Distillation baselines of the MiB paper's Table 1 (docs/methods.md): LwF, LwF-MC and ILT.

- LwF: Li & Hoiem, "Learning without Forgetting", TPAMI 2017.
- LwF-MC: the multi-class LwF of Rebuffi et al., "iCaRL", CVPR 2017 (binary losses, no exemplars).
- ILT: Michieli & Zanuttigh, "Incremental Learning Techniques for Semantic Segmentation",
  ICCV-W 2019 (output and feature distillation).
Default weights are those of the MiB paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from incseg.losses import (
    cross_entropy,
    feature_distillation,
    knowledge_distillation,
    one_hot_bce,
    sigmoid_distillation,
)
from incseg.methods.base import Method
from incseg.protocol.steps import StepInfo
from incseg.ranges import ALPHA, LOSS_WEIGHT, ranged

if TYPE_CHECKING:  # annotations only: the model modules import torchvision
    from incseg.models.segmenter import SegmenterOutput


@dataclass
class LwF(Method):
    """Cross-entropy + ``kd_weight`` x distillation of the old channels' softmax."""

    needs_old_model: ClassVar[bool] = True
    plain_first_step: ClassVar[bool] = True

    kd_weight: float = ranged(100.0, LOSS_WEIGHT)
    alpha: float = ranged(1.0, ALPHA)

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        terms = {"ce": cross_entropy(output.logits, targets)}
        if info.step > 0 and self.kd_weight > 0:
            kd = knowledge_distillation(output.logits, old_output.logits, self.alpha)
            terms["kd"] = self.kd_weight * kd
        return terms


@dataclass
class LwFMC(Method):
    """One-hot BCE over all channels (every step) + ``kd_weight`` x sigmoid distillation x O."""

    needs_old_model: ClassVar[bool] = True

    kd_weight: float = ranged(10.0, LOSS_WEIGHT)

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        terms = {"bce": one_hot_bce(output.logits, targets)}
        if info.step > 0 and self.kd_weight > 0:
            terms["kd"] = self.kd_weight * sigmoid_distillation(output.logits, old_output.logits)
        return terms


@dataclass
class ILT(LwF):
    """LwF's output distillation + ``feature_weight`` x MSE between old and new encoder features."""

    features: ClassVar[tuple[str, ...]] = ("body",)

    feature_weight: float = ranged(100.0, LOSS_WEIGHT)

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        terms = super().losses(output, old_output, targets, info)
        if info.step > 0 and self.feature_weight > 0:
            mse = feature_distillation(output.features["body"], old_output.features["body"])
            terms["feature"] = self.feature_weight * mse
        return terms
