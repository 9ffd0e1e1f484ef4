"""BalConpas (Chen et al., "Strike a Balance in Continual Panoptic Segmentation", ECCV 2024;
jinpeng0528/BalConpas 3b76142) on incseg's Mask2Former, without replay (``balconpas``).

Step 0 is Mask2Former's own training (``m2f_ft``'s, which it shares). At steps > 0 the frozen
old model runs on the batch first; its final prediction gives pseudo targets for the old classes
outside the step's labels (:func:`incseg.balconpas_losses.pseudo_targets`), placed before the
ground truth, and the new model's queries matched to them are pulled towards the old model's
query states at every prediction (past-class backtrace distillation, ``med`` term, weight
``med_tokens_weight`` 5.0: ``CONT.MED_TOKENS_WEIGHT`` of
``configs/ade20k/semantic-segmentation/continual_maskformer2_R101_bs8_160k.yaml:13``). The class,
mask and dice terms are Mask2Former's (2 / 5 / 5, no-object 0.1, every prediction), with the
class loss of replayed images (:func:`incseg.balconpas_losses.memory_labels_loss`). docs/methods.md
("balconpas") lists what differs from the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from incseg.balconpas_losses import OVERLAP_THRESHOLD, balconpas_criterion, pseudo_targets
from incseg.methods.query import (
    QueryMethod,
    grouped_terms,
    mask2former_first_step_key,
    targets_of,
)
from incseg.methods.ssul import MEMORY_SIZE
from incseg.protocol.choices import IGNORE_INDEX
from incseg.protocol.steps import StepInfo
from incseg.ranges import Range, ranged

if TYPE_CHECKING:
    from incseg.models.mask2former.segmenter import QueryOutput
    from incseg.protocol.memory import Exemplar


@dataclass
class BalConpas(QueryMethod):
    """Hyperparameters: ``med_tokens_weight`` (``CONT.MED_TOKENS_WEIGHT`` 5.0),
    ``overlap_threshold`` (the share of its own area an old query's pseudo target must keep,
    ``MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD`` 0.8) and ``memory_size`` (0: BalConpas; 300:
    BalConpas-R, ``memory_selection_sem.py:102``), besides Mask2Former's criterion's.

    The memory (from step 1): images chosen so that the class histogram of the memory follows
    the global one (:func:`incseg.protocol.memory.select_by_frequency`), joined to the step's
    images (``train_continual.py:193-210``), each labelled with the classes it was counted for,
    everything else ignored (``memory_selection_sem.py:88-98``, :meth:`memory_lut`)."""

    memory_rule: ClassVar[str] = "frequency"
    needs_old_model: ClassVar[bool] = True
    # pseudo-labels go where the labels have no mask: a background class would cover them all
    pseudo_labels_old_pixels: ClassVar[bool] = True
    features: ClassVar[tuple[str, ...]] = ("queries",)

    med_tokens_weight: float = ranged(5.0, Range(0, 1000, "weight of the query distillation"))
    overlap_threshold: float = ranged(
        OVERLAP_THRESHOLD, Range(0, 1, "share of its area an old query's target must keep")
    )
    memory_size: int = ranged(0, MEMORY_SIZE)

    def memory_lut(self, info: StepInfo, exemplar: Exemplar) -> torch.Tensor:
        """A memory image's labels: the classes it was counted for at their channels, every other
        value 255 (ignored)."""
        lut = torch.full((256,), IGNORE_INDEX, dtype=torch.uint8)
        channel = {c: k for k, c in enumerate(info.order)}
        for c in exemplar.classes:
            lut[c] = channel[c]
        return lut

    @classmethod
    def first_step_key(cls, params: dict[str, Any]) -> object | None:
        """Step 0 is Mask2Former's training, the same as ``m2f_ft``'s (its criterion's keys)."""
        return mask2former_first_step_key(params)

    def losses(
        self,
        output: QueryOutput,
        old_output: QueryOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        """Terms ``ce``, ``mask``, ``dice`` and, at steps > 0, ``med``; ``targets``: ``(B, H,
        W)`` channel indices, 255 = ignore."""
        found = targets_of(targets, output.first_channel)
        first_new = info.num_old_channels - output.first_channel
        replayed = [bool((t["labels"] < first_new).any()) for t in found]
        num_classes = output.pred_logits.shape[-1] - 1
        distill = None
        if old_output is not None:
            pseudo = self.pseudo_targets(old_output, found, replayed, targets.shape[-2:])
            found = [
                t if r else _join(p, t) for p, t, r in zip(pseudo, found, replayed, strict=True)
            ]
            # criterion.py:273: the pseudo count, also on replayed images, whose targets hold
            # none (the official distils their first ground-truth targets then; kept)
            distill = (output.queries, old_output.queries, [len(p["labels"]) for p in pseudo])
        raw = balconpas_criterion(
            output.as_dict(), found, num_classes, self.criterion_weights, replayed, distill
        )
        weights = self.criterion_weights
        factors = {"ce": weights.class_weight, "mask": weights.mask_weight}
        return grouped_terms(
            raw, factors | {"dice": weights.dice_weight, "med": self.med_tokens_weight}
        )

    def pseudo_targets(
        self, old_output: QueryOutput, found: list[dict], replayed: list[bool], size: torch.Size
    ) -> list[dict[str, torch.Tensor]]:
        """Per image the old model's pseudo targets, its masks upsampled bilinearly to the
        labels' size first (``maskformer_model.py:252-257``)."""
        masks = F.interpolate(
            old_output.pred_masks.float(), size=tuple(size), mode="bilinear", align_corners=False
        )
        return [
            pseudo_targets(
                old_output.pred_logits[b], masks[b], t["masks"], r, self.overlap_threshold
            )
            for b, (t, r) in enumerate(zip(found, replayed, strict=True))
        ]


def _join(pseudo: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict:
    """Pseudo targets first, then the ground truth (``criterion.py:264-266``)."""
    masks = pseudo["masks"].to(target["masks"].dtype)
    return {
        "labels": torch.cat([pseudo["labels"], target["labels"]]),
        "masks": torch.cat([masks, target["masks"]]),
    }
