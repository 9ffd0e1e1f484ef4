"""DKD and DKD-M (Baek et al., "Decomposed Knowledge Distillation for Class-Incremental Semantic
Segmentation", NeurIPS 2022), as the official code computes them (cvlab-yonsei/DKD at fb4693f;
``file:line`` below are in that repository, ``T:`` is ``trainer/trainer_voc.py``).
docs/methods.md, ``dkd``.

Model: ``model.architecture: dkd`` (:mod:`incseg.models.heads`): one sigmoid per class, no
background classifier, channel 0 an auxiliary classifier on detached features.

Loss (every term a per-class mean over *all* pixels, then summed over classes; ``T:84-128,
341-376``, ``models/loss.py``):

- ``mbce``: BCE of the step's new classes against their one-hot labels, positives weighted by
  ``pos_weight`` (``pos_weight_first`` at step 0); background, old, future *and void* pixels are
  negatives (``loss.py:74-83`` builds the target from zeros and masks nothing);
- ``kd``: BCE of the old classes' logits against the old model's sigmoids (``T:354-357``);
- ``dkd_pos`` / ``dkd_neg``: the same on the positive and negative parts of the old classes'
  logits at feature resolution (:func:`incseg.models.heads.decomposed_logits`, ``T:362-372``);
- ``ac``: BCE of the auxiliary channel against 0 (``loss.py:110-120``), at every step.

Weights 1 / 5 / 5 / 5 / 1 (``configs/config_voc.json:75-82``). Steps > 0: every batch norm and
the head's dropout in eval mode, batch-norm affine parameters not trained (``model.py:117-125,
150-153, 177-195``); new classifiers start as the auxiliary classifier (``model.py:110-115``).
LR groups (``train_voc.py:127-143``): backbone x1, head and classifiers x10; at steps > 0 weight
decay only on the new classifier. Memory (DKD-M): ``memory_size`` images in total joining the
step's training images, with the step's labels (their old classes are background,
``data_loader/dataset.py:501-520``), chosen class-balanced (:mod:`incseg.protocol.memory`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from incseg.methods.base import Method
from incseg.methods.ssul import MEMORY_SIZE
from incseg.protocol.steps import StepInfo
from incseg.ranges import LOSS_WEIGHT, Range, ranged

if TYPE_CHECKING:
    from incseg.models.segmenter import SegmenterOutput

POS_WEIGHT = Range(0, 1000, "weight of the positive term of the new classes' BCE")
# The memory selection's pseudo-label threshold (utils/memory.py:95-105).
MEMORY_THRESHOLD = 0.9


def class_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Per-class BCE with logits, mean over batch and pixels: ``(B, K, h, w)`` logits and
    same-shape targets in [0, 1] -> ``(K,)``; positives weighted by ``pos_weight``
    (``WBCELoss`` / ``KDLoss``, ``models/loss.py:59-107``)."""
    weight = torch.full((logits.shape[1], 1, 1), pos_weight, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), pos_weight=weight, reduction="none"
    )
    return loss.mean(dim=(0, 2, 3))


def new_class_targets(labels: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """``(B, count, H, W)`` one-hot of channels ``first .. first + count - 1`` of ``labels``
    (``(B, H, W)``); every other value, void included, is 0 in every channel (``loss.py:74-78``)."""
    channels = torch.arange(first, first + count, device=labels.device).view(1, -1, 1, 1)
    return (labels.long().unsqueeze(1) == channels).float()


def trained_parameters(module: nn.Module, step: int) -> list[nn.Parameter]:
    """``module``'s parameters an SGD group of step ``step`` holds: all at step 0; at steps > 0
    all but the batch norms' affine ones, which ``freeze_all_bn`` leaves out of the optimizer
    (DKD ``model.py:177-181, 191-195``; STAR ``model.py:155, 169``)."""
    if step == 0:
        return list(module.parameters())
    norms = {
        id(p) for m in module.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    }
    return [p for p in module.parameters() if id(p) not in norms]


def step_groups(
    model: nn.Module, step: int, scale: float, new_scale: float, old_decay: float | None
) -> list[dict]:
    """The SGD groups of DKD and STAR: backbone x1, head and classifiers x ``scale``; at steps >
    0 the new classifier x ``new_scale`` and the other groups with weight decay ``old_decay``
    (None: the run's). DKD ``train_voc.py:127-143``, STAR ``train_voc.py:123-142``."""
    if step == 0:
        return [
            {"params": trained_parameters(model.backbone, 0)},
            {"params": trained_parameters(model.head, 0), "lr_scale": scale},
            {"params": trained_parameters(model.classifiers, 0), "lr_scale": scale},
        ]
    decay = {} if old_decay is None else {"weight_decay": old_decay}
    old = nn.ModuleList(model.classifiers[:-1])
    return [
        {"params": trained_parameters(model.backbone, step), **decay},
        {"params": trained_parameters(model.head, step), "lr_scale": scale, **decay},
        {"params": trained_parameters(old, step), "lr_scale": scale, **decay},
        {"params": trained_parameters(model.classifiers[-1], step), "lr_scale": new_scale},
    ]


@dataclass
class DKD(Method):
    """DKD / DKD-M (module docstring).

    Attributes:
        memory_size: exemplar images in total (0: DKD; 100 VOC / 300 ADE20K: DKD-M).
        pos_weight_first, pos_weight: positive weight of the new classes' BCE at step 0 and at
            steps > 0 (VOC 2 / 1, ADE20K 35 / 35).
        mbce, kd, dkd_pos, dkd_neg, ac: the terms' weights.
        classifier_lr_scale: LR factor of the head and classifiers (10).
    """

    architecture: ClassVar[str] = "dkd"
    needs_old_model: ClassVar[bool] = True
    # The -M variant's memory on VOC (``incseg compare --methods NAME-m``).
    memory_variant: ClassVar[int] = 100
    features: ClassVar[tuple[str, ...]] = ("logits_pos", "logits_neg")

    memory_size: int = ranged(0, MEMORY_SIZE)
    pos_weight_first: float = ranged(2.0, POS_WEIGHT)
    pos_weight: float = ranged(1.0, POS_WEIGHT)
    mbce: float = ranged(1.0, LOSS_WEIGHT)
    kd: float = ranged(5.0, LOSS_WEIGHT)
    dkd_pos: float = ranged(5.0, LOSS_WEIGHT)
    dkd_neg: float = ranged(5.0, LOSS_WEIGHT)
    ac: float = ranged(1.0, LOSS_WEIGHT)
    classifier_lr_scale: float = ranged(10.0, Range(0, 1000, "LR factor"))

    def init_new_classifier(self, model: nn.Module, info: StepInfo) -> None:
        """Each new class starts as the auxiliary classifier (weight and bias); only with the
        auxiliary loss on, as the official ``train_voc.py:118-122``."""
        if self.ac <= 0:
            return
        aux, new = model.classifiers[0].auxiliary, model.classifiers[-1]
        with torch.no_grad():
            new.weight.copy_(aux.weight.expand_as(new.weight))
            new.bias.copy_(aux.bias.expand_as(new.bias))

    def begin_step(self, info: StepInfo, model: nn.Module) -> None:
        model.frozen_norm = model.frozen_dropout = info.step > 0

    def param_groups(self, model: nn.Module, info: StepInfo) -> list[dict]:
        scale = self.classifier_lr_scale  # weight decay only on the new classifier at steps > 0
        return step_groups(model, info.step, scale, scale, old_decay=0.0)

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        logits = output.logits
        first = info.num_old_channels if info.step > 0 else 1
        count = info.num_channels - first
        pos_weight = self.pos_weight_first if info.step == 0 else self.pos_weight
        onehot = new_class_targets(targets, first, count)
        terms = {"mbce": self.mbce * class_bce(logits[:, first:], onehot, pos_weight).sum()}
        if info.step > 0:
            assert old_output is not None, "DKD needs the old model's outputs at steps > 0"
            old = info.num_old_channels
            soft = torch.sigmoid(old_output.logits[:, 1:].float())
            terms["kd"] = self.kd * class_bce(logits[:, 1:old], soft).sum()
            for name, weight in (("pos", self.dkd_pos), ("neg", self.dkd_neg)):
                student = output.features[f"logits_{name}"][:, : old - 1]
                teacher = torch.sigmoid(old_output.features[f"logits_{name}"].float())
                terms[f"dkd_{name}"] = weight * class_bce(student, teacher).sum()
        aux = logits[:, :1]
        terms["ac"] = self.ac * class_bce(aux, torch.zeros_like(aux)).sum()
        return terms

    def memory_pseudo_labels(
        self, old_output: SegmenterOutput, targets: torch.Tensor, info: StepInfo
    ) -> torch.Tensor:
        """Background pixels where the highest class sigmoid is at least 0.9 take that class
        (``utils/memory.py:95-105``; incseg runs the trained model of that step, see
        docs/methods.md)."""
        score, pred = torch.sigmoid(old_output.logits[:, 1:].float()).max(1)
        fill = (targets == 0) & (score >= MEMORY_THRESHOLD)
        return torch.where(fill, pred + 1, targets)
