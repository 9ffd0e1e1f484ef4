"""The methods of the query-based model (``model.architecture: mask2former``,
:mod:`incseg.models.mask2former`): what they share, and fine-tuning (``m2f_ft``).

A query-based method trains Mask2Former's set prediction: its labels ``(B, H, W)`` (channel
indices of the step, 255 = ignore) become one binary mask per class present in each image
(:func:`incseg.query_losses.masks_from_labels`, the semantic dataset mapper's targets), the
queries are matched to them (:func:`incseg.query_losses.hungarian_match`) and the matched pairs
trained with the class cross-entropy and the point-sampled mask BCE and dice, at every decoder
layer (:func:`incseg.query_losses.set_criterion`; facebookresearch/Mask2Former
``mask2former/modeling/criterion.py``). Its parameter groups are the official optimiser's
(``train_net.py:184-230``): the backbone's LR scaled by ``backbone_lr``, no weight decay on
normalisation layers and embeddings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from incseg.methods.base import Method
from incseg.protocol.steps import StepInfo
from incseg.query_losses import (
    CriterionWeights,
    masks_from_labels,
    set_criterion,
)
from incseg.ranges import Range, ranged

if TYPE_CHECKING:
    from incseg.models.mask2former.segmenter import QueryOutput

_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
_WEIGHT = Range(0, 1000, "loss weight")


def mask2former_param_groups(
    model: nn.Module, backbone_lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """The official optimiser's groups (Mask2Former ``train_net.py:206-230``): a parameter of a
    module whose name contains ``backbone`` at ``backbone_lr`` times the step's LR; of a norm
    layer or an ``nn.Embedding``, no weight decay (``WEIGHT_DECAY_NORM`` and
    ``WEIGHT_DECAY_EMBED`` are 0.0 in the ADE20K configs); frozen parameters left out; each
    parameter once. Grouped by (LR factor, decay) here, where the official makes one group per
    parameter: AdamW updates each parameter on its own, so the steps are the same."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            scale = backbone_lr if "backbone" in name else 1.0
            decay = 0.0 if isinstance(module, (*_NORMS, nn.Embedding)) else weight_decay
            groups.setdefault((scale, decay), []).append(param)
    return [
        {"params": params, "lr_scale": scale, "weight_decay": decay}
        for (scale, decay), params in groups.items()
    ]


def targets_of(labels: torch.Tensor, first_channel: int = 0) -> list[dict[str, torch.Tensor]]:
    """``(B, H, W)`` channel indices (255 = ignore) -> per image the classes present and their
    binary masks (:func:`incseg.query_losses.masks_from_labels`), as class indices of the head:
    ``channel - first_channel``. With ``first_channel`` 1 (a head without a background class)
    background pixels get no mask, as void pixels in the official mapper
    (``mask_former_semantic_dataset_mapper.py:168-172`` with CoMFormer's ``remove_bkg``)."""
    out = []
    for label in labels:
        target = masks_from_labels(label)
        keep = target["labels"] >= first_channel
        out.append(
            {"labels": target["labels"][keep] - first_channel, "masks": target["masks"][keep]}
        )
    return out


@dataclass
class QueryMethod(Method):
    """What every query-based method shares: the architecture, the set criterion's weights
    (the ADE20K configs' ``MODEL.MASK_FORMER`` keys) and the official parameter groups.

    ``weight_decay`` of the groups is ``train.weight_decay`` (0.05 in the official configs),
    read from the optimiser's defaults: the groups here only say which parameters get none.
    """

    architecture: ClassVar[str] = "mask2former"

    class_weight: float = ranged(2.0, _WEIGHT)
    mask_weight: float = ranged(5.0, _WEIGHT)
    dice_weight: float = ranged(5.0, _WEIGHT)
    no_object_weight: float = ranged(0.1, Range(0, 1, "CE weight of the no-object class"))
    num_points: int = ranged(12544, Range(1, 10_000_000, "points sampled per mask"))
    oversample_ratio: float = ranged(3.0, Range(1, 100, "candidate points per sampled point"))
    importance_ratio: float = ranged(
        0.75, Range(0, 1, "share of the points taken where the prediction is least certain")
    )
    backbone_lr: float = ranged(0.1, Range(0, 10, "the backbone's LR factor"))

    @property
    def criterion_weights(self) -> CriterionWeights:
        return CriterionWeights(
            class_weight=self.class_weight,
            mask_weight=self.mask_weight,
            dice_weight=self.dice_weight,
            no_object_weight=self.no_object_weight,
            num_points=self.num_points,
            oversample_ratio=self.oversample_ratio,
            importance_sample_ratio=self.importance_ratio,
        )

    def param_groups(self, model: nn.Module, info: StepInfo) -> list[dict[str, Any]]:
        groups = mask2former_param_groups(model, self.backbone_lr, weight_decay=-1.0)
        for group in groups:  # -1: the optimiser's own weight decay (train.weight_decay)
            if group["weight_decay"] < 0:
                del group["weight_decay"]
        return groups

    def set_losses(
        self, output: QueryOutput, targets: list[dict[str, torch.Tensor]], num_classes: int
    ) -> dict[str, torch.Tensor]:
        """The weighted set criterion as three terms, ``ce``, ``mask`` and ``dice``
        (:func:`grouped_terms`)."""
        weights = self.criterion_weights
        raw = set_criterion(output.as_dict(), targets, num_classes, weights)
        factors = {"ce": weights.class_weight, "mask": weights.mask_weight}
        return grouped_terms(raw, factors | {"dice": weights.dice_weight})


def grouped_terms(
    raw: dict[str, torch.Tensor], factors: dict[str, float]
) -> dict[str, torch.Tensor]:
    """An official criterion's unweighted losses (``loss_ce``, ``loss_ce_0``, ... one per
    decoder prediction) -> one weighted term per kind (``ce``: the sum over predictions of
    ``factors["ce"] * loss_ce_i``): what the engine logs; the terms' sum is the official total
    (Mask2Former ``maskformer_model.py:209-217``)."""
    terms: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        kind = key.removeprefix("loss_").split("_")[0]
        terms[kind] = terms.get(kind, 0) + factors[kind] * value
    return terms


def mask2former_first_step_key(params: dict[str, Any]) -> object:
    """The step-0 key of the methods whose step 0 is Mask2Former's own training (``m2f_ft``,
    ``balconpas``): the set criterion's hyperparameters, :class:`QueryMethod`'s fields."""
    step_0 = {f.name for f in dataclasses.fields(QueryMethod)}
    return ("mask2former first step", {k: v for k, v in params.items() if k in step_0})


@dataclass
class QueryFineTuning(QueryMethod):
    """Fine-tuning of the query-based model: the set criterion on the step's labels only (old
    classes are background, as the step's labels give them); the lower bound of the query-based
    tables."""

    @classmethod
    def first_step_key(cls, params: dict[str, Any]) -> object | None:
        return mask2former_first_step_key(params)

    def losses(
        self,
        output: QueryOutput,
        old_output: QueryOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        num_classes = output.pred_logits.shape[-1] - 1
        return self.set_losses(output, targets_of(targets, output.first_channel), num_classes)
