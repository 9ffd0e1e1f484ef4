"""ECLIPSE (Kim et al., "ECLIPSE: Efficient Continual Learning in Panoptic Segmentation with
Visual Prompt Tuning", CVPR 2024; clovaai/ECLIPSE 9266720) on incseg's Mask2Former.

Step 0 trains Mask2Former with ECLIPSE's class head (an MLP per step, ``CONT.DEEP_CLS``) and its
sigmoid focal class loss (:mod:`incseg.eclipse_losses`). At each later step everything trained
before is frozen (``freeze_for_prompt_tuning``, ``mask2former/maskformer_model.py:616-691``)
but the step's new pieces and the shared no-object classifier: a group of ``P`` prompt queries
with their per-layer position embeddings and their own mask MLP, trained alone
(:class:`incseg.models.mask2former.prompts.PromptedDecoder`), and the step's classifier. They
start as copies (``maskformer_model.py:694-748``): the prompts as the mean of the base queries,
the mask MLP as the base one, the classifier as the no-object classifier with its last layer
repeated. No old model, no distillation: the frozen model keeps the old classes; the logit
manipulation at inference (``model.mask2former.logit_deltas``) arbitrates between groups.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from incseg.eclipse_losses import FOCAL_ALPHA, FOCAL_GAMMA, sigmoid_focal_labels_loss
from incseg.methods.query import QueryMethod, grouped_terms, targets_of
from incseg.protocol.steps import StepInfo
from incseg.query_losses import set_criterion
from incseg.ranges import Range, ranged

if TYPE_CHECKING:
    from incseg.models.mask2former.segmenter import QueryOutput


@dataclass
class ECLIPSE(QueryMethod):
    """Hyperparameters: ``class_weight`` at step 0 (2.0) and ``class_weight_incremental`` after
    (10.0; both also the matcher's class cost, ``script/ade_ss/*.sh``), ``focal_alpha`` /
    ``focal_gamma`` (5, 1: ``mask2former/config.py:38-39``), besides Mask2Former's criterion's.
    ``no_object_weight`` is not used (the focal loss has none)."""

    # trains prompt queries after step 0: needs model.mask2former.prompts (config check)
    uses_prompts: ClassVar[bool] = True

    class_weight_incremental: float = ranged(10.0, Range(0, 1000, "class loss weight after step 0"))
    focal_alpha: float = ranged(FOCAL_ALPHA, Range(0, 1000, "factor of the focal class loss"))
    focal_gamma: float = ranged(FOCAL_GAMMA, Range(0, 100, "exponent of the focal class loss"))

    def init_new_classifier(self, model: nn.Module, info: StepInfo) -> None:
        """After step 0: the step's prompts, mask MLP and classifier start as copies
        (``copy_prompt_embed_weights``, ``copy_mask_embed_weights``, ``copy_no_obj_weights``)."""
        if info.step == 0:
            return
        decoder = model.predictor
        with torch.no_grad():
            feat = decoder.query_feat.weight.mean(0, keepdim=True)
            decoder.prompt_feat[-1].weight.copy_(feat.expand_as(decoder.prompt_feat[-1].weight))
            pos = decoder.query_embed.weight.mean(0, keepdim=True)
            for embedding in decoder.prompt_embed[-1]:
                embedding.weight.copy_(pos.expand_as(embedding.weight))
            decoder.prompt_mask_embed[-1].load_state_dict(decoder.mask_embed.state_dict())
            no_object = decoder.class_embed.no_object.state_dict()
            new = model.classifiers[-1]
            state = {
                key: value.expand_as(new.state_dict()[key]).clone()
                for key, value in no_object.items()
            }
            new.load_state_dict(state)

    def begin_step(self, info: StepInfo, model: nn.Module) -> None:
        """After step 0 only the step's classifier, the no-object classifier and the step's
        prompts (with their mask MLP) train (``freeze_for_prompt_tuning`` with the scripts'
        ``*_FREEZE True``); normalisation statistics still update, as the official's."""
        if info.step == 0:
            return
        model.requires_grad_(False)
        decoder = model.predictor
        for module in (
            model.classifiers[-1],
            decoder.class_embed.no_object,
            decoder.prompt_feat[-1],
            decoder.prompt_embed[-1],
            decoder.prompt_mask_embed[-1],
        ):
            module.requires_grad_(True)

    def losses(
        self,
        output: QueryOutput,
        old_output: QueryOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        """Terms ``ce`` (sigmoid focal), ``mask`` and ``dice`` over the predictions the model
        returns (after step 0: the prompts' first and last)."""
        found = targets_of(targets, output.first_channel)
        weight = self.class_weight if info.step == 0 else self.class_weight_incremental
        weights = dataclasses.replace(self.criterion_weights, class_weight=weight)
        focal = functools.partial(
            sigmoid_focal_labels_loss, alpha=self.focal_alpha, gamma=self.focal_gamma
        )
        num_classes = output.pred_logits.shape[-1] - 1
        raw = set_criterion(output.as_dict(), found, num_classes, weights, class_loss=focal)
        factors = {"ce": weight, "mask": weights.mask_weight, "dice": weights.dice_weight}
        return grouped_terms(raw, factors)
