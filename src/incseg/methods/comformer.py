"""CoMFormer (Cermelli et al., "CoMFormer: Continual Learning in Semantic and Panoptic
Segmentation", CVPR 2023; fcdl94/CoMFormer 640496b) on incseg's Mask2Former.

Per batch of a step t > 0 the frozen old model runs first; its final prediction gives

- pseudo-labels: the old model's confident queries become extra target masks of old classes
  where the step's labels have none (:func:`incseg.comformer_losses.pseudo_labels`,
  ``continual/method_wrapper/maskformer.py:98-146``, its masks upsampled bilinearly to the
  labels' size first, ``:99-106``);
- the unbiased distillation of the query class scores, weighted per query by
  ``(1 - p_old(no-object))^2`` (:func:`incseg.comformer_losses.unbiased_kd`,
  ``continual/method_wrapper/loss.py:90-106``), on the final prediction only.

Every prediction of the decoder is trained with the softmax matcher, a focal class loss (alpha 5,
gamma 1, no no-object weight) and the softmax mask losses
(:func:`incseg.comformer_losses.comformer_criterion`). The model is the one its scripts train:
masks softmaxed over queries in the decoder's attention masks (``model.mask2former.
mask_activation: softmax``, ``SOFTMASK True``), no background class (``background: false``:
CoMFormer's mapper removes class 0, ``MASK_BG False``) and its inference (``inference:
comformer``); the shipped configs set all three. docs/methods.md, "comformer", lists what its
code could not run as committed and what incseg follows instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from incseg.comformer_losses import (
    CoMFormerWeights,
    comformer_criterion,
    mask2former_pod,
    pseudo_labels,
)
from incseg.methods.query import QueryMethod, grouped_terms, targets_of
from incseg.protocol.steps import StepInfo
from incseg.ranges import Range, ranged

if TYPE_CHECKING:
    from incseg.models.mask2former.segmenter import QueryOutput


# PSEUDO_THRESHOLD of CoMFormer's config (continual/config.py:35), 0.0 in every script
PSEUDO_THRESHOLD = Range(0, 1, "class score an old query needs to give a pseudo-label")


@dataclass
class CoMFormerFT(QueryMethod):
    """Fine-tuning as CoMFormer's code trains it (its "FT" rows: no ``CONT.DIST`` flag): the
    softmax matcher, the focal class loss and the softmax mask losses on the step's labels, no
    old model; the lower bound of CoMFormer's tables, on CoMFormer's model.
    ``no_object_weight`` is not used: with the focal loss the official applies none."""

    focal_alpha: float = ranged(5.0, Range(0, 1000, "factor of the focal class loss"))
    focal_gamma: float = ranged(1.0, Range(0, 100, "exponent of the focal class loss"))

    @classmethod
    def first_step_key(cls, params: dict[str, Any]) -> object | None:
        """CoMFormer and its FT train the same step 0 (no old model there): the criterion's
        hyperparameters, the distillation's and pseudo-labels' left out."""
        step_0 = {f.name for f in dataclasses.fields(CoMFormerFT)}
        return ("comformer first step", {k: v for k, v in params.items() if k in step_0})

    def comformer_weights(self, kd_weight: float = 0.0, **kd: float | None) -> CoMFormerWeights:
        return CoMFormerWeights(
            class_weight=self.class_weight,
            mask_weight=self.mask_weight,
            dice_weight=self.dice_weight,
            kd_weight=kd_weight,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
            num_points=self.num_points,
            oversample_ratio=self.oversample_ratio,
            importance_sample_ratio=self.importance_ratio,
            **kd,
        )

    def losses(
        self,
        output: QueryOutput,
        old_output: QueryOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        """Terms ``ce``, ``mask`` and ``dice``, each summed over the decoder's predictions;
        ``targets``: ``(B, H, W)`` channel indices, 255 = ignore."""
        found = targets_of(targets, output.first_channel)
        return self.terms(output, found, None, self.comformer_weights())

    @staticmethod
    def terms(
        output: QueryOutput,
        found: list[dict[str, torch.Tensor]],
        old_logits: torch.Tensor | None,
        weights: CoMFormerWeights,
    ) -> dict[str, torch.Tensor]:
        num_old = 0 if old_logits is None else old_logits.shape[-1] - 1
        raw = comformer_criterion(output.as_dict(), found, num_old, old_logits, weights)
        factors = {"ce": weights.class_weight, "mask": weights.mask_weight}
        return grouped_terms(raw, factors | {"dice": weights.dice_weight, "kd": weights.kd_weight})


@dataclass
class CoMFormer(CoMFormerFT):
    """Hyperparameters (``CONT.DIST.*`` and ``MODEL.MASK_FORMER.FOCAL_*`` of its scripts).

    ``kd_weight``: 10 as README.md:30 and the 100-10 / 100-5 scripts (``scripts/ade10.sh:18``,
    ``ade5.sh:20``); ``scripts/ade.sh:17`` trains 100-50 with 0.5 (and the maintainer's answer
    in its issue #1 says the same), which the ``ade/100-50-comformer`` config sets.
    ``no_object_weight`` is not used: with the focal loss the official applies none.
    """

    needs_old_model: ClassVar[bool] = True
    # pseudo-labels go where the labels have no mask: a background class would cover them all
    pseudo_labels_old_pixels: ClassVar[bool] = True

    kd_weight: float = ranged(10.0, Range(0, 10_000, "weight of the unbiased distillation"))
    kd_alpha: float = ranged(1.0, Range(0, 100, "factor of the old logits in the distillation"))
    # exponent of (1 - p_old(no-object)) weighting each query's distillation (CONT.DIST.KD_REW);
    # 0 = every query weighs the same
    kd_reweight_gamma: float = ranged(2.0, Range(0, 100, "exponent of the query reweighting"))
    pseudo: bool = True
    pseudo_threshold: float = ranged(0.0, PSEUDO_THRESHOLD)

    def losses(
        self,
        output: QueryOutput,
        old_output: QueryOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        """:class:`CoMFormerFT`'s terms with, at steps > 0, the old model's pseudo-labels among
        the targets and the ``kd`` term."""
        weights = self.comformer_weights(
            self.kd_weight, kd_alpha=self.kd_alpha, kd_reweight_gamma=self.kd_reweight_gamma or None
        )
        found = targets_of(targets, output.first_channel)
        if old_output is None:
            return self.terms(output, found, None, weights)
        if self.pseudo:
            found = self.with_pseudo_labels(old_output, found, targets.shape[-2:])
        return self.terms(output, found, old_output.pred_logits.float(), weights)

    def with_pseudo_labels(
        self, old_output: QueryOutput, targets: list[dict], size: torch.Size
    ) -> list[dict]:
        return with_pseudo_labels(old_output, targets, size, self.pseudo_threshold)


def with_pseudo_labels(
    old_output: QueryOutput, targets: list[dict], size: torch.Size, threshold: float
) -> list[dict]:
    """Each image's targets with the old model's pseudo-labels appended (its masks upsampled
    bilinearly to the labels' ``size`` first, ``maskformer.py:99-106``)."""
    masks = F.interpolate(
        old_output.pred_masks.float(), size=tuple(size), mode="bilinear", align_corners=False
    )
    logits = old_output.pred_logits.float()
    return [
        pseudo_labels(logits[b], masks[b], target, threshold) for b, target in enumerate(targets)
    ]


@dataclass
class MaskMiB(CoMFormerFT):
    """MiB on Mask2Former as CoMFormer's code trains it (README.md:32-33: ``KD_WEIGHT 200``,
    ``UKD True``, ``UCE True``; no reweighting, no pseudo-labels): at steps > 0 the class loss of
    every prediction is the unbiased focal CE (a no-object target scores no-object plus the old
    classes, :func:`incseg.comformer_losses.unbiased_focal_ce`, ``loss.py:16-37``,
    ``set_criterion.py:60-62``) and the unbiased distillation of the last prediction weighs every
    query alike. Step 0 is CoMFormer's."""

    needs_old_model: ClassVar[bool] = True

    kd_weight: float = ranged(200.0, Range(0, 10_000, "weight of the unbiased distillation"))
    kd_alpha: float = ranged(1.0, Range(0, 100, "factor of the old logits in the distillation"))

    def losses(
        self,
        output: QueryOutput,
        old_output: QueryOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        """:class:`CoMFormerFT`'s terms with, at steps > 0, the unbiased class loss and ``kd``."""
        if old_output is None:
            return super().losses(output, None, targets, info)
        found = targets_of(targets, output.first_channel)
        weights = self.comformer_weights(
            self.kd_weight, kd_alpha=self.kd_alpha, kd_reweight_gamma=None, uce=True
        )
        return self.terms(output, found, old_output.pred_logits.float(), weights)


@dataclass
class MaskPLOP(CoMFormerFT):
    """PLOP on Mask2Former as CoMFormer's code trains it (README.md:36: ``PSEUDO True``,
    ``PSEUDO_TYPE 1``, ``POD_WEIGHT 0.001``; no ``KD_WEIGHT``, ``UKD``, ``UCE``): at steps > 0 the
    old model's pseudo-labels join the targets, as CoMFormer's (``make_pseudolabels2``; at
    640496b ``PSEUDO_TYPE`` is read and unused, ``maskformer.py:41, 166-167``), and the
    local POD of res2-res5 and ``mask_features`` (:func:`incseg.comformer_losses.
    mask2former_pod`) is added with weight ``pod_weight * sqrt(new / all)``: the step's classes
    over every class so far, background excluded when the head has none (``maskformer.py:64-66``,
    ``continual/method_wrapper/base.py:11-20``). No logit distillation. Step 0 is CoMFormer's."""

    needs_old_model: ClassVar[bool] = True
    # pseudo-labels go where the labels have no mask: a background class would cover them all
    pseudo_labels_old_pixels: ClassVar[bool] = True
    features: ClassVar[tuple[str, ...]] = ("maps",)
    # res5 (stride 32) must be 4 wide for POD's finest grid; checked by the config
    min_crop_size: ClassVar[int] = 128

    pod_weight: float = ranged(0.001, Range(0, 1000, "weight of the local POD"))
    pseudo_threshold: float = ranged(0.0, PSEUDO_THRESHOLD)

    def losses(
        self,
        output: QueryOutput,
        old_output: QueryOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        """:class:`CoMFormerFT`'s terms on the targets with pseudo-labels, and ``pod``."""
        if old_output is None:
            return super().losses(output, None, targets, info)
        found = targets_of(targets, output.first_channel)
        found = with_pseudo_labels(old_output, found, targets.shape[-2:], self.pseudo_threshold)
        terms = self.terms(output, found, None, self.comformer_weights())
        # base.py:11-20: each count gains the background only with a background class
        bg = 1 - output.first_channel
        new, every = len(info.new_classes) + bg, info.num_channels - 1 + bg
        pod = mask2former_pod(old_output.maps, output.maps)
        terms["pod"] = self.pod_weight * (new / every) ** 0.5 * pod
        return terms
