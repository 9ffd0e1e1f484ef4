"""Distillation baselines of the MiB paper's Table 1 (SPEC section 6): LwF, LwF-MC and ILT.

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
)  # fmt: skip
from incseg.methods.base import Method
from incseg.protocol.steps import StepInfo
from incseg.ranges import ALPHA, LOSS_WEIGHT, Range

if TYPE_CHECKING:  # annotations only: the model modules import torchvision
    from incseg.models.segmenter import SegmenterOutput


@dataclass
class LwF(Method):
    """Cross-entropy + ``kd_weight`` x distillation of the old channels' softmax."""

    needs_old_model: ClassVar[bool] = True
    plain_first_step: ClassVar[bool] = True

    ranges: ClassVar[dict[str, Range]] = {"kd_weight": LOSS_WEIGHT, "alpha": ALPHA}

    kd_weight: float = 100.0
    alpha: float = 1.0

    def losses(
        self, output: SegmenterOutput, old_output: SegmenterOutput | None, targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        terms = {"ce": cross_entropy(output.logits, targets)}
        if info.step > 0 and self.kd_weight > 0:
            kd = knowledge_distillation(output.logits, old_output.logits, self.alpha)
            terms["kd"] = self.kd_weight * kd
        return terms


@dataclass
class LwFMC(Method):
    """One-hot BCE over all channels (every step) + ``kd_weight`` x sigmoid distillation x O."""

    needs_old_model: ClassVar[bool] = True

    ranges: ClassVar[dict[str, Range]] = {"kd_weight": LOSS_WEIGHT}

    kd_weight: float = 10.0

    def losses(
        self, output: SegmenterOutput, old_output: SegmenterOutput | None, targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        terms = {"bce": one_hot_bce(output.logits, targets)}
        if info.step > 0 and self.kd_weight > 0:
            terms["kd"] = self.kd_weight * sigmoid_distillation(output.logits, old_output.logits)
        return terms


@dataclass
class ILT(Method):
    """LwF's output distillation + ``feature_weight`` x MSE between old and new encoder features."""

    needs_old_model: ClassVar[bool] = True
    features: ClassVar[tuple[str, ...]] = ("body",)
    plain_first_step: ClassVar[bool] = True

    ranges: ClassVar[dict[str, Range]] = {
        "kd_weight": LOSS_WEIGHT,
        "feature_weight": LOSS_WEIGHT,
        "alpha": ALPHA,
    }

    kd_weight: float = 100.0
    feature_weight: float = 100.0
    alpha: float = 1.0

    def losses(
        self, output: SegmenterOutput, old_output: SegmenterOutput | None, targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        terms = {"ce": cross_entropy(output.logits, targets)}
        if info.step > 0:
            if self.kd_weight > 0:
                kd = knowledge_distillation(output.logits, old_output.logits, self.alpha)
                terms["kd"] = self.kd_weight * kd
            if self.feature_weight > 0:
                mse = feature_distillation(output.features["body"], old_output.features["body"])
                terms["feature"] = self.feature_weight * mse
        return terms
