"""BalConpas's terms on Mask2Former (Chen et al., "Strike a Balance in Continual Panoptic
Segmentation", ECCV 2024; jinpeng0528/BalConpas 3b76142), restated from its code:

- pseudo targets (:func:`pseudo_targets`, ``mask2former/maskformer_model.py:266-279, 329-380``):
  the old model's final queries whose top class (softmax) is not no-object, sorted by score;
  each pixel goes to the query of highest ``score * sigmoid(mask)``; a query's target is its
  pixels with ``sigmoid(mask) >= 0.5`` outside the current ground truth, kept if it keeps more
  than ``overlap`` (0.8, ``TEST.OVERLAP_THRESHOLD``) of its own ``>= 0.5`` area; one target per
  query, placed *before* the ground truth;
- replayed images, recognised by a ground-truth class outside the current step
  (``criterion.py:247-250``), get no pseudo targets and a class loss without the no-object
  penalty, the other images' no-object weight rescaled (:func:`memory_labels_loss`,
  ``criterion.py:141-160``);
- the past-class backtrace distillation (:func:`balconpas_criterion`, ``criterion.py:272-315``):
  on the new model's queries matched (at the final prediction) to pseudo targets, the MSE
  between the new and the old model's query states (before ``decoder_norm``) of every
  prediction, ``loss_med_tokens[_i]``.

Targets are per image ``{"labels": (n,) int64, "masks": (n, H, W)}`` with class indices of the
head (no-object ``K`` excluded), as :mod:`incseg.query_losses`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from incseg.query_losses import (
    CriterionWeights,
    Indices,
    Targets,
    hungarian_match,
    labels_loss,
    masks_loss,
)

OVERLAP_THRESHOLD = (
    0.8  # MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD, maskformer2_R50_bs16_160k.yaml:43
)


@torch.no_grad()
def pseudo_targets(
    old_logits: torch.Tensor,
    old_masks: torch.Tensor,
    gt_masks: torch.Tensor,
    replayed: bool = False,
    overlap: float = OVERLAP_THRESHOLD,
) -> dict[str, torch.Tensor]:
    """One image's pseudo targets from the old model (``generate_psd_targets``).

    Args:
        old_logits: ``(Q, K_old + 1)`` the old model's final class logits, no-object last.
        old_masks: ``(Q, H, W)`` its final mask logits upsampled to the label size.
        gt_masks: ``(n, H, W)`` the image's ground-truth masks (any dtype; non-zero = inside).
        replayed: a replayed image keeps the ground-truth pixels eligible (``:365-367``).
        overlap: the share of its own area a query must keep.

    Returns:
        ``{"labels": (m,) int64, "masks": (m, H, W) bool}`` in descending score order (ties:
        the lower query first; the official's ``argsort`` leaves them unspecified).
    """
    num_old = old_logits.shape[-1] - 1
    scores, labels = F.softmax(old_logits.float(), dim=-1).max(-1)
    keep = labels.ne(num_old)
    order = scores[keep].argsort(descending=True, stable=True)
    labels, scores = labels[keep][order], scores[keep][order]
    probs = old_masks[keep][order].float().sigmoid()
    if probs.shape[0] == 0:
        return {"labels": labels, "masks": probs >= 0.5}
    old_area = (probs >= 0.5).sum(dim=(1, 2))
    owner = (scores.view(-1, 1, 1) * probs).argmax(0)
    owned = owner[None] == torch.arange(len(labels), device=owner.device)[:, None, None]
    masks = owned & (probs >= 0.5)
    if not replayed:
        masks &= ~(gt_masks.int().sum(0).clamp(0, 1).bool())
    new_area = masks.sum(dim=(1, 2))
    kept = (new_area > 0) & (new_area > old_area * overlap)
    return {"labels": labels[kept], "masks": masks[kept]}


def memory_labels_loss(
    pred_logits: torch.Tensor,
    targets: Targets,
    indices: Indices,
    num_classes: int,
    eos: float,
    replayed: Sequence[bool],
) -> torch.Tensor:
    """The class loss of a batch with replayed images (``criterion.py:141-160``): on replayed
    images CE with no weight on no-object (an unmatched query costs nothing); on the others
    CE with the no-object weight ``eos * (bg_replayed + bg_current) / bg_current`` (``bg``:
    unmatched queries); the sum over both divided by ``0.1 * B * Q + 0.9 * matched`` (the
    official's literal 0.1 / 0.9). Without a replayed image: Mask2Former's weighted mean
    (:func:`incseg.query_losses.labels_loss`)."""
    if not any(replayed):
        return labels_loss(pred_logits, targets, indices, num_classes, eos)
    logits = pred_logits.float()
    batch, queries = logits.shape[:2]
    classes = torch.full((batch, queries), num_classes, dtype=torch.int64, device=logits.device)
    for b, (src, tgt) in enumerate(indices):
        classes[b, src] = targets[b]["labels"][tgt]
    memory = torch.tensor(list(replayed), dtype=torch.bool, device=logits.device)
    matched = [len(src) for src, _ in indices]
    matched_memory = sum(m for m, r in zip(matched, replayed, strict=True) if r)
    background_memory = int(memory.sum()) * queries - matched_memory
    background_current = int((~memory).sum()) * queries - (sum(matched) - matched_memory)
    weight_memory = torch.ones(num_classes + 1, device=logits.device)
    weight_memory[-1] = 0.0
    weight = torch.ones(num_classes + 1, device=logits.device)
    weight[-1] = eos
    if background_current > 0:
        weight[-1] *= (background_memory + background_current) / background_current
    ce_memory = F.cross_entropy(
        logits[memory].transpose(1, 2), classes[memory], weight_memory, reduction="none"
    )
    ce_current = F.cross_entropy(
        logits[~memory].transpose(1, 2), classes[~memory], weight, reduction="none"
    )
    denominator = batch * queries * 0.1 + sum(matched) * 0.9
    return (ce_memory.sum() + ce_current.sum()) / denominator


def _to_old(states: torch.Tensor, indices: Indices, num_pseudo: Sequence[int]) -> torch.Tensor:
    """``(B, Q, C)`` -> ``(M, C)``: each image's queries matched to one of its first
    ``num_pseudo`` targets (the pseudo ones), images in order (``criterion.py:273-285``)."""
    picked = [states[b][src[tgt < n]] for b, ((src, tgt), n) in enumerate(zip(indices, num_pseudo))]
    return torch.cat(picked)


def balconpas_criterion(
    outputs: dict,
    targets: Targets,
    num_classes: int,
    weights: CriterionWeights,
    replayed: Sequence[bool],
    distill: tuple[list[torch.Tensor], list[torch.Tensor], list[int]] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """BalConpas's unweighted losses (``SetCriterion.forward``, ``criterion.py:238-317``).

    Args:
        outputs: Mask2Former's output dict (``pred_logits``, ``pred_masks``, ``aux_outputs``).
        targets: per image the targets the losses see: ground truth, and before it the pseudo
            targets on images that are not replayed (``criterion.py:254-266``).
        num_classes: ``K``, no-object excluded.
        weights: Mask2Former's criterion settings.
        replayed: per image, whether it is a replayed one.
        distill: ``(new_states, old_states, num_pseudo)``: the query states of every prediction
            of both models (``(B, Q, C)`` each, aux first) and per image the count of pseudo
            targets leading its targets; adds ``loss_med_tokens`` (final) and
            ``loss_med_tokens_i``, each the MSE on the queries the *final* matching gives them.
        generator: as :func:`incseg.query_losses.set_criterion`.

    Returns:
        ``loss_ce``, ``loss_mask``, ``loss_dice`` (and ``loss_med_tokens``) for the final
        prediction, the same with suffix ``_i`` for each aux one; random draws in the official
        order (matching, then the points of each prediction). The normaliser of the mask
        losses counts the pseudo targets too (``:288``).
    """
    normalizer = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
    stages = [("", outputs)]
    stages += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
    final: Indices | None = None
    losses: dict[str, torch.Tensor] = {}
    for position, (suffix, out) in enumerate(stages):
        indices = hungarian_match(
            out["pred_logits"],
            out["pred_masks"],
            targets,
            weights.matcher_weights(),
            generator=generator,
        )
        final = indices if final is None else final
        losses["loss_ce" + suffix] = memory_labels_loss(
            out["pred_logits"], targets, indices, num_classes, weights.no_object_weight, replayed
        )
        stage = masks_loss(out["pred_masks"], targets, indices, normalizer, weights, generator)
        losses.update({key + suffix: value for key, value in stage.items()})
        if distill is not None:
            new_states, old_states, num_pseudo = distill
            layer = len(new_states) - 1 if position == 0 else position - 1
            losses["loss_med_tokens" + suffix] = _states_mse(
                _to_old(new_states[layer], final, num_pseudo),
                _to_old(old_states[layer].detach(), final, num_pseudo),
            )
    return losses


def _states_mse(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``F.mse_loss`` (mean over every element); 0 when no query is matched to a pseudo target,
    where the official's mean of nothing is NaN and stops its training
    (``detectron2 train_loop.py`` ``write_metrics``)."""
    if new.numel() == 0:
        return new.sum().float()
    return F.mse_loss(new.float(), old.float())
