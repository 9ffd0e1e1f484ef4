"""MiB: Modeling the Background (Cermelli et al., CVPR 2020); docs/methods.md, ``mib``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn

from incseg.losses import (
    cross_entropy,
    pixel_mean_cross_entropy,
    unbiased_cross_entropy,
    unbiased_cross_entropy_all_pixels,
    unbiased_knowledge_distillation,
)
from incseg.methods.base import Method
from incseg.protocol.steps import StepInfo
from incseg.ranges import ALPHA, LOSS_WEIGHT, ranged

if TYPE_CHECKING:  # annotations only: the model modules import torchvision
    from incseg.models.segmenter import SegmenterOutput

Init = Literal["balanced", "random"]  # new classifiers: MiB's init, or left random
# the pixels the cross-entropy averages over: those not labelled 255, or all of them
CeReduction = Literal["valid", "all"]


def balanced_init(model: nn.Module) -> None:
    """Background-balanced init of the newest classifier (MiB section 3.3; fcdl94/MiB
    ``segmentation_module.py`` ``init_new_classifier``; PLOP's ``--init_balanced`` is the same
    code): each new class and the background start with an equal share of the old background
    probability; old-class probabilities are unchanged.

    new weights = w_bg; new biases = b_bg' = b_bg - log(N + 1), N = number of new channels.
    """
    first, new = model.classifiers[0], model.classifiers[-1]
    with torch.no_grad():
        bias = first.bias[0] - math.log(new.out_channels + 1)
        new.weight.copy_(first.weight[0:1].expand_as(new.weight))
        new.bias.fill_(bias)
        first.bias[0] = bias


@dataclass
class MiB(Method):
    """Unbiased cross-entropy + weighted unbiased distillation + background-balanced init.

    Attributes:
        kd_weight: lambda of the distillation term (10; 100 in the paper for VOC 15-1).
        alpha: scale of the old logits in the distillation soft targets (1).
        unce: use the unbiased cross-entropy (False: plain CE, for ablations).
        unkd: add the unbiased distillation term.
        init: ``"balanced"`` (the paper) or ``"random"`` initialisation of new classifiers.
        ce_reduction: the pixels the (unbiased) cross-entropy is averaged over, at every step:
            ``"valid"`` (default): those not labelled 255. fcdl94/MiB takes ``.mean()`` of the
            per-pixel loss over all pixels (``train.py:27-35, 103-107``), but its training labels
            hold no 255 (void is background, ``dataset/voc.py:142-148``), so the two agree;
            cssegmentation averages over non-void pixels (``reduction='mean'``,
            ``csseg/modules/models/losses/celoss.py:32-34, 58``). ``"all"``: all ``B*H*W``
            pixels, void ones counting 0, as ygjwd12345/UCD, whose training labels keep 255
            (``train.py:30, 37-40, 112, 116``; ``dataset/voc.py:182-207``).
    """

    needs_old_model: ClassVar[bool] = True
    plain_first_step: ClassVar[bool] = True

    kd_weight: float = ranged(10.0, LOSS_WEIGHT)
    alpha: float = ranged(1.0, ALPHA)
    unce: bool = True
    unkd: bool = True
    init: Init = "balanced"
    ce_reduction: CeReduction = "valid"

    def init_new_classifier(self, model: nn.Module, info: StepInfo) -> None:
        if self.init == "balanced" and info.step > 0:
            balanced_init(model)

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        num_old = info.num_old_channels
        if info.step == 0 or not self.unce:
            terms = {"ce": self._cross_entropy(output.logits, targets)}
        elif self.ce_reduction == "all":
            terms = {"unce": unbiased_cross_entropy_all_pixels(output.logits, targets, num_old)}
        else:
            terms = {"unce": unbiased_cross_entropy(output.logits, targets, num_old)}
        if info.step > 0 and self.unkd and self.kd_weight > 0:
            assert old_output is not None, "MiB needs the old model's outputs at steps > 0"
            kd = unbiased_knowledge_distillation(output.logits, old_output.logits, self.alpha)
            terms["unkd"] = self.kd_weight * kd
        return terms

    def _cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Plain cross-entropy (step 0, or ``unce: false``), averaged as ``ce_reduction`` says."""
        if self.ce_reduction == "all":
            return pixel_mean_cross_entropy(logits, targets)
        return cross_entropy(logits, targets)
