"""RCIL: representation compensation with pooled-cube distillation (Zhang et al.,
"Representation Compensation Networks for Continual Semantic Segmentation", CVPR 2022), as the
official code computes it (zhangchbin/RCIL at b9aad58, a fork of PLOP's code; ``file:line`` below
are in that repository). It trains :mod:`incseg.models.rcil`'s architecture
(``model.architecture: rcil``), whose branches merge at the start of each step > 0.

Loss (``train.py:464-564``; ``--method RCIL``, ``argparser.py:49-59``):

- step 0: cross-entropy, ``reduction="none"`` then the mean over all pixels (``train.py:194,
  470-471``); steps > 0: MiB's unbiased cross-entropy averaged the same way (``:170-173``), plus
  ``kd_weight`` x MiB's unbiased distillation (100, alpha 1; ``:206-207, 514-524``), plus
  pooled-cube distillation (PCD, ``:20-133``) of six maps, old model vs new: the four backbone
  stages' activated outputs, the head's output and the small logits (the student's new channels
  summed into its background, ``:85-89``). Every map is squared, then
  - spatial (all six, ``:70-133``): ``avg_pool2d`` with k x k windows, k in 4, 8, 12, 16, 20, 24,
    stride 1, padding k/2; per map the mean over k of the batch mean of each image's L2 norm of
    the difference;
  - channel (the first five, ``:20-67``): a 3-channel average over neighbouring channels
    (``avg_pool2d`` of the channel axis, zero padding counted); the batch mean of each image's
    L2 norm of the difference;
  each map weighted by ``sqrt(C_t / N_new) * factor`` (``factor`` 0.01, the last map of each
  list 0.0005: the logits in the spatial term, the head in the channel term; on ADE20K 5e-6 and
  5e-7) and each term divided by its number of maps.
- No pseudo-labels and no adaptive factor (PLOP's; ``--pseudo`` is unset).

New classifiers (``segmentation_module.py:239-264``): the weights copy the background's; the
bias keeps its random initialisation and the background bias is unchanged (the MiB shift is
applied for ``cityscapes_domain`` only). cssegmentation's RCIL (``csseg/modules/runners/rcil.py``)
does not run as committed; its differences are listed in docs/methods.md, ``rcil``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from incseg.losses import (
    merge_new_logits,
    pixel_mean_cross_entropy,
    unbiased_cross_entropy_all_pixels,
    unbiased_knowledge_distillation,
)
from incseg.methods.base import Method
from incseg.models.rcil import parallel_layers
from incseg.protocol.steps import StepInfo
from incseg.ranges import ALPHA, LOSS_WEIGHT, ranged

if TYPE_CHECKING:
    from incseg.models.segmenter import SegmenterOutput

# The distilled maps, in the official order (train.py:527-532; segmentation_module.py:340).
PCD_MAPS = ("stage1_out", "stage2_out", "stage3_out", "stage4_out", "head", "logits_small")
# Window sizes of the spatial term, in the order the official code adds them (train.py:106-111).
PCD_WINDOWS = (4, 8, 16, 20, 24, 12)


def _squared_pair(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if old.shape[1] != new.shape[1]:
        new = merge_new_logits(new, old.shape[1])
    return old.float() ** 2, new.float() ** 2


def _batch_norm_of_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm((a - b).reshape(a.shape[0], -1), dim=-1).mean()


def pcd_spatial(
    old: list[torch.Tensor], new: list[torch.Tensor], factors: list[float], schedule: float
) -> torch.Tensor:
    """The spatial term of PCD (``features_distillation_spatial``, ``train.py:70-133``).

    Args:
        old, new: maps ``(B, C, h, w)`` of the old and the new model (the new logits may have
            more channels: they are summed into the background).
        factors: one weight per map; schedule: ``sqrt(C_t / N_new)``.
    """
    loss = old[0].new_zeros((), dtype=torch.float32)
    for a, b, factor in zip(old, new, factors, strict=True):
        a, b = _squared_pair(a, b)
        layer = sum(
            _batch_norm_of_difference(
                F.avg_pool2d(a, k, stride=1, padding=k // 2),
                F.avg_pool2d(b, k, stride=1, padding=k // 2),
            )
            for k in PCD_WINDOWS
        )
        loss = loss + layer / len(PCD_WINDOWS) * schedule * factor
    return loss / len(old)


def pcd_channel(
    old: list[torch.Tensor], new: list[torch.Tensor], factors: list[float], schedule: float
) -> torch.Tensor:
    """The channel term of PCD (``features_distillation_channel``, ``train.py:20-67``): a
    3-wide average over neighbouring channels. Arguments as :func:`pcd_spatial`."""
    loss = old[0].new_zeros((), dtype=torch.float32)
    for a, b, factor in zip(old, new, factors, strict=True):
        a, b = _squared_pair(a, b)
        pooled = [
            F.avg_pool2d(x.permute(0, 2, 1, 3), (3, 1), stride=1, padding=(1, 0)) for x in (a, b)
        ]
        loss = loss + _batch_norm_of_difference(*pooled) * schedule * factor
    return loss / len(old)


@dataclass
class RCIL(Method):
    """RCIL's losses on its two-branch architecture (module docstring).

    Attributes:
        kd_weight: weight of MiB's unbiased distillation (``--loss_kd 100``).
        alpha: MiB's alpha (1).
        pcd_factor: PCD weight of every map but the last of each term (0.01; 5e-6 on ADE20K,
            ``train.py:57-60, 123-126``).
        pcd_last_factor: PCD weight of the logits (spatial) and the head (channel) (0.0005;
            5e-7 on ADE20K, ``train.py:50-53, 116-119``).
    """

    architecture: ClassVar[str] = "rcil"
    needs_old_model: ClassVar[bool] = True
    features: ClassVar[tuple[str, ...]] = PCD_MAPS

    kd_weight: float = ranged(100.0, LOSS_WEIGHT)
    alpha: float = ranged(1.0, ALPHA)
    pcd_factor: float = ranged(0.01, LOSS_WEIGHT)
    pcd_last_factor: float = ranged(0.0005, LOSS_WEIGHT)

    def init_new_classifier(self, model: nn.Module, info: StepInfo) -> None:
        first, new = model.classifiers[0], model.classifiers[-1]
        with torch.no_grad():
            new.weight.copy_(first.weight[0:1].expand_as(new.weight))

    def begin_step(self, info: StepInfo, model: nn.Module) -> None:
        if info.step > 0:  # run.py:423, after the previous step's weights and the new classifier
            for layer in parallel_layers(model):
                layer.merge()

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        if info.step == 0:
            return {"ce": pixel_mean_cross_entropy(output.logits, targets)}
        assert old_output is not None, "RCIL needs the old model's outputs at steps > 0"
        num_old = info.num_old_channels
        terms = {"unce": unbiased_cross_entropy_all_pixels(output.logits, targets, num_old)}
        if self.kd_weight > 0:
            kd = unbiased_knowledge_distillation(output.logits, old_output.logits, self.alpha)
            terms["unkd"] = self.kd_weight * kd
        old = [old_output.features[name] for name in PCD_MAPS]
        new = [output.features[name] for name in PCD_MAPS]
        schedule = math.sqrt(info.num_channels / info.channels_per_step[-1])
        spatial = [self.pcd_factor] * (len(PCD_MAPS) - 1) + [self.pcd_last_factor]
        channel = [self.pcd_factor] * (len(PCD_MAPS) - 2) + [self.pcd_last_factor]
        terms["pcd"] = pcd_spatial(old, new, spatial, schedule) + pcd_channel(
            old[:-1], new[:-1], channel, schedule
        )
        return terms
