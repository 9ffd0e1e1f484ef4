"""MiB: Modeling the Background (Cermelli et al., CVPR 2020); docs/methods.md, ``mib``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn

from incseg.losses import cross_entropy, unbiased_cross_entropy, unbiased_knowledge_distillation
from incseg.methods.base import Method
from incseg.protocol.steps import StepInfo
from incseg.ranges import ALPHA, LOSS_WEIGHT, ranged

if TYPE_CHECKING:  # annotations only: the model modules import torchvision
    from incseg.models.segmenter import SegmenterOutput

Init = Literal["balanced", "random"]  # new classifiers: MiB's init, or left random


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
    """

    needs_old_model: ClassVar[bool] = True
    plain_first_step: ClassVar[bool] = True

    kd_weight: float = ranged(10.0, LOSS_WEIGHT)
    alpha: float = ranged(1.0, ALPHA)
    unce: bool = True
    unkd: bool = True
    init: Init = "balanced"

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
        if info.step == 0:
            return {"ce": cross_entropy(output.logits, targets)}
        terms = {}
        if self.unce:
            terms["unce"] = unbiased_cross_entropy(output.logits, targets, info.num_old_channels)
        else:
            terms["ce"] = cross_entropy(output.logits, targets)
        if self.unkd and self.kd_weight > 0:
            assert old_output is not None, "MiB needs the old model's outputs at steps > 0"
            kd = unbiased_knowledge_distillation(output.logits, old_output.logits, self.alpha)
            terms["unkd"] = self.kd_weight * kd
        return terms
