"""CoMFormer's matcher, losses, pseudo-labels and semantic inference as pure functions.

CoMFormer (Cermelli et al., CVPR 2023) trains Mask2Former incrementally with three changes:
query masks are a softmax over the queries (every pixel belongs to exactly one query), the
class loss is a focal cross-entropy, and the old model supplies both unbiased knowledge
distillation (UKD) on the class scores and pseudo-labels for old classes. These functions
restate that math without detectron2 or ``nn.Module`` state; the numbers are the official ones.

Reference: fcdl94/CoMFormer at 640496b (file:line below are at that commit):

* ``mask2former/modeling/matcher.py:139-204`` - ``SoftmaxMatcher``;
* ``mask2former/modeling/mask_losses.py:23-37`` (pairwise soft dice), ``:112-130`` (softmax
  dice), ``:153-161`` (softmax mask CE, positive term only);
* ``continual/method_wrapper/set_criterion.py:45-88`` (``loss_labels``), ``:156-197``
  (``forward``), ``:200-269`` (``SoftmaxKDSetCriterion.loss_masks``);
* ``continual/method_wrapper/loss.py:5-13`` (focal), ``:16-37`` (unbiased focal CE, MiB's
  UCE), ``:90-106`` (UKD);
* ``continual/method_wrapper/maskformer.py:36-37, 64-73`` (loss weights), ``:98-146``
  (``make_pseudolabels2``), ``:160-167`` (label shift);
* ``mask2former/maskformer_model.py:83`` (mask threshold 0.5), ``:332-376``
  (``semantic_inference``, the ``softmask`` and not ``mask_bg`` branch);
* ``mask2former/modeling/criterion.py:32-46, 212-222`` (uncertainty, permutation indices);
* detectron2 ``projects/PointRend/point_rend/point_features.py`` (``point_sample``,
  ``get_uncertain_point_coords_with_randomness``).

Settings used by the CoMFormer scripts: ``SOFTMASK True FOCAL True`` (README.md:26-30,
scripts/ade*.sh) with ``FOCAL_ALPHA 5``, ``FOCAL_GAMMA 1`` (mask2former/config.py:37-39);
``UKD True KD_REW True`` (reweighting gamma 2, loss.py:90), ``ALPHA 1``, ``KD_DEEP False`` (KD
on the final decoder layer only), ``PSEUDO True`` with ``PSEUDO_THRESHOLD 0``
(continual/config.py:20-36); ``OBJECT_MASK_THRESHOLD 0`` and ``OVERLAP_THRESHOLD 0``; loss
weights, points and ratios of configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml
:21-38. With focal on, the no-object weight (0.1) is not applied anywhere.

MiB on the same model (README.md:32-33, on top of the mask-based ``SOFTMASK True FOCAL True``
of README.md:26-27): ``KD_WEIGHT 200 UKD True UCE True``, with ``KD_REW False`` and
``PSEUDO False`` (their defaults, continual/config.py:27, 32). Here that is
``CoMFormerWeights(uce=True, kd_reweight_gamma=None, kd_weight=200.0)`` and no
:func:`pseudo_labels`; the class loss becomes :func:`unbiased_focal_ce`.

Conventions: ``pred_logits`` ``(B, Q, K + 1)`` float, classes ``0 .. K - 1`` with the old
classes first (``0 .. Ko - 1``), then the new ones, and no-object last (index ``K``);
``pred_masks`` ``(B, Q, H, W)`` float mask logits (softmaxed over ``Q`` here). Targets are a
list of ``B`` dicts ``{"labels": (n_i,) int64 in [0, K), "masks": (n_i, H, W) bool or float}``.
Dataset class ``c >= 1`` (0 = background, dropped) is logit index ``c - 1``
(maskformer.py:160-163); :func:`targets_from_label_map` builds such targets, and
:func:`comformer_inference` paints logit index ``k`` as ``k + 1`` so that its output is in the
dataset's ids again.

Randomness: every ``torch.rand`` call of the official is made here, in the same order, with the
same shapes. With ``generator=None`` the numbers come from the device's global generator, as in
the official; a passed generator must live on the masks' device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from incseg.losses import local_pod_embedding
from incseg.query_losses import (
    Indices,
    Targets,
    assign,
    aux_count,
    expand_weights,
    masks_from_labels,
    matched_queries,
    matched_target_masks,
    one_process,
    point_sample,
    uncertain_point_coords,
    weighted_sum,
)

# The hard-coded mask-probability threshold of pseudo-labelling and inference
# (maskformer.py:131-132, maskformer_model.py:83).
MASK_THRESHOLD = 0.5


def focal_ce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 5.0,
    gamma: float = 1.0,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Focal cross-entropy ``mean(alpha * (1 - p_t)^gamma * CE)`` (loss.py:5-13, 'mean').

    Args:
        logits: ``(N, K + 1)`` float; or ``(B, K + 1, Q)`` as the official passes it.
        targets: ``(N,)`` (or ``(B, Q)``) int64 class indices; ``ignore_index`` entries give 0.
        alpha, gamma: CoMFormer's config uses 5 and 1 (mask2former/config.py:38-39).
        ignore_index: skipped in the CE, but still counted in the mean, as official.

    Returns:
        0-dim tensor. ``p_t = exp(-CE)`` keeps its gradient, as official.
    """
    ce = F.cross_entropy(logits, targets, reduction="none", ignore_index=ignore_index)
    pt = torch.exp(-ce)
    return (alpha * (1 - pt) ** gamma * ce).mean()


def unbiased_focal_ce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_old_classes: int,
    alpha: float = 5.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """MiB's unbiased CE on the query classes inside the focal loss (loss.py:16-37, 'mean').

    The official ``focal_uce_loss`` (loss.py:16-24), which ``loss_labels`` calls when both
    ``UCE`` and ``FOCAL`` are on (set_criterion.py:60-62), is ``focal_loss`` with its CE
    replaced by ``unbiased_cross_entropy_loss`` (loss.py:27-37, ``weights=None``)::

        den          = logsumexp(logits over all K + 1 classes)
        log p(c)     = logits[c] - den                                for c < K
        log p_bg     = logsumexp(logits[K], logits[0 .. Ko - 1]) - den
        CE           = -log p(target), with log p_bg at target K (no-object)
        loss         = mean(alpha * (1 - exp(-CE)) ** gamma * CE)

    So a query whose target is no-object is right when it predicts no-object *or* an old
    class, whose objects the new step's labels leave unlabelled; an old-class or new-class
    target keeps its ordinary log-probability. With ``num_old_classes`` 0 this is
    :func:`focal_ce` (the official then does not take this path, set_criterion.py:31).

    Args:
        logits: ``(N, K + 1)`` float; or ``(B, K + 1, Q)`` as the official passes it. Classes
            ``0 .. Ko - 1`` the old ones, no-object last.
        targets: ``(N,)`` (or ``(B, Q)``) int64 in ``[0, K]``. No ignore index: the official's
            ``F.nll_loss`` keeps its default (-100), and the criterion makes none.
        num_old_classes: ``Ko`` in ``[0, K]`` (the official's ``old_cl``).
        alpha, gamma: CoMFormer's config uses 5 and 1 (mask2former/config.py:38-39).

    Returns:
        0-dim tensor. ``p_t = exp(-CE)`` keeps its gradient, as official.
    """
    num_classes = logits.shape[1] - 1
    if not 0 <= num_old_classes <= num_classes:
        raise ValueError(f"num_old_classes {num_old_classes} is not in [0, {num_classes}]")
    den = torch.logsumexp(logits, dim=1)
    merged = torch.cat((logits[:, -1:], logits[:, :num_old_classes]), dim=1)
    log_p_bg = torch.logsumexp(merged, dim=1) - den
    log_probs = torch.cat((logits[:, :-1] - den.unsqueeze(1), log_p_bg.unsqueeze(1)), dim=1)
    ce = F.nll_loss(log_probs, targets, reduction="none")
    pt = torch.exp(-ce)
    return (alpha * (1 - pt) ** gamma * ce).mean()


def _pairwise_soft_dice(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(2 p.t + 1) / (|p| + |t| + 1)`` for every pair (mask_losses.py:23-37).

    A similarity in ``(0, 1]`` despite the official name ``batch_soft_dice_loss``.
    ``probs`` ``(N, P)``, ``targets`` ``(M, P)``; returns ``(N, M)``.
    """
    numerator = 2 * torch.einsum("nc,mc->nm", probs, targets)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return (numerator + 1) / (denominator + 1)


def _softmax_match_cost(
    logits: torch.Tensor,
    masks: torch.Tensor,
    target: dict[str, torch.Tensor],
    num_points: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One image's ``(Q, n)`` cost on CPU (matcher.py:150-197)."""
    cost_class = logits.softmax(-1)[:, target["labels"]]
    probs = masks.softmax(dim=0)[:, None]
    target_masks = target["masks"].to(probs)[:, None]
    # One set of points for all queries and targets, so their scores are comparable.
    coords = torch.rand(1, num_points, 2, device=probs.device, generator=generator)
    target_points = point_sample(
        target_masks, coords.repeat(target_masks.shape[0], 1, 1), align_corners=False
    ).squeeze(1)
    points = point_sample(probs, coords.repeat(probs.shape[0], 1, 1), align_corners=False)
    points = points.squeeze(1)
    # The official turns autocast off here so the dice is float32 under AMP.
    with torch.autocast(device_type=probs.device.type, enabled=False):
        dice = _pairwise_soft_dice(points.float(), target_points.float())
    # Both terms are in [0, 1] with 1 best: minus their harmonic mean is the cost.
    cost = -2 * (cost_class * dice) / (cost_class + dice)
    return cost.reshape(logits.shape[0], -1).cpu()


@torch.no_grad()
def softmax_matcher(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    targets: Targets,
    num_points: int = 12544,
    generator: torch.Generator | None = None,
) -> Indices:
    """CoMFormer's one-to-one assignment of queries to target masks (matcher.py:139-204).

    Per image: masks are softmaxed over the queries; class score ``s = p_q(label)``, mask score
    ``d`` = soft dice similarity on ``num_points`` uniform points shared by all queries and
    targets (one ``torch.rand(1, num_points, 2)`` per image, in batch order); cost
    ``-2 s d / (s + d)``, solved by ``scipy.optimize.linear_sum_assignment``. The cost weights
    of the config are not used by this matcher. No gradient.

    Args:
        pred_logits: ``(B, Q, K + 1)`` class logits, no-object last.
        pred_masks: ``(B, Q, H, W)`` mask logits.
        targets: ``B`` dicts, ``labels`` ``(n_i,)`` int64, ``masks`` ``(n_i, H_i, W_i)``.
        num_points: ``TRAIN_NUM_POINTS`` (12544).
        generator: optional generator on the masks' device; None = global (as official).

    Returns:
        ``B`` pairs ``(query_idx, target_idx)`` of int64 CPU tensors of length
        ``min(Q, n_i)``, ``query_idx`` increasing.
    """
    return [
        assign(
            _softmax_match_cost(pred_logits[b], pred_masks[b], targets[b], num_points, generator)
        )
        for b in range(pred_logits.shape[0])
    ]


def _softmax_uncertainty(sampled: torch.Tensor) -> torch.Tensor:
    """CoMFormer's uncertainty of sampled mask probabilities, ``-|2p - 1|``
    (set_criterion.py:229): taken on the *sampled* probability; sampling ``2p - 1`` would differ
    near the border, where ``grid_sample`` pads with zeros."""
    return -((2 * sampled - 1).abs())


def softmax_mask_losses(
    pred_masks: torch.Tensor,
    indices: Indices,
    targets: Targets,
    num_masks: float,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Point-sampled mask CE and dice of matched softmax masks (set_criterion.py:201-256).

    Masks are softmaxed over the queries first. Points: ``num_points`` per matched mask, by
    importance sampling on ``-|2p - 1|`` (two ``torch.rand`` calls, no gradient). On them:
    ``loss_mask = sum_masks mean_points(-log p * t) / num_masks`` (only the positive term of a
    CE, mask_losses.py:153-161; ``log p`` is bilinearly sampled from ``log_softmax``) and
    ``loss_dice = sum_masks (1 - (2 p.t + 1) / (|p| + |t| + 1)) / num_masks``
    (mask_losses.py:112-130).

    Args:
        pred_masks: ``(B, Q, H, W)`` mask logits.
        indices: matcher output, ``B`` pairs ``(query_idx, target_idx)``.
        targets: ``B`` dicts with ``masks`` ``(n_i, H_i, W_i)`` in {0, 1}.
        num_masks: normaliser (target masks averaged over processes, at least 1).
        num_points, oversample_ratio, importance_sample_ratio: PointRend settings.
        generator: optional generator on the masks' device; None = global (as official).

    Returns:
        ``{"loss_mask", "loss_dice"}``, 0-dim tensors.
    """
    src = matched_queries(indices)
    probs = pred_masks.softmax(dim=1)[src][:, None]
    log_probs = torch.log_softmax(pred_masks, dim=1)[src][:, None]
    target_masks = matched_target_masks(targets, indices, probs)[:, None]
    # Points are chosen from the predictions but carry no gradient, as official.
    with torch.no_grad():
        coords = uncertain_point_coords(
            probs,
            num_points,
            oversample_ratio,
            importance_sample_ratio,
            generator,
            _softmax_uncertainty,
        )
        labels = point_sample(target_masks, coords, align_corners=False).squeeze(1)
    point_probs = point_sample(probs, coords, align_corners=False).squeeze(1)
    point_log_probs = point_sample(log_probs, coords, align_corners=False).squeeze(1)
    loss_mask = (-point_log_probs * labels).mean(1).sum() / num_masks
    numerator = 2 * (point_probs * labels).sum(-1)
    denominator = point_probs.sum(-1) + labels.sum(-1)
    loss_dice = (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks
    return {"loss_mask": loss_mask, "loss_dice": loss_dice}


def unbiased_kd(
    new_logits: torch.Tensor,
    old_logits: torch.Tensor,
    alpha: float = 1.0,
    reweight_gamma: float | None = 2.0,
) -> torch.Tensor:
    """Unbiased knowledge distillation on the query classes (loss.py:90-106).

    Per query, KL from the old distribution ``q = softmax(alpha * old)`` over ``Ko`` old
    classes + no-object to the new one where the new classes and no-object are merged:
    ``log p(no-object) = logsumexp(new[Ko:]) - logsumexp(new)``. Reduced as
    ``sum w * KL / sum w`` with ``w = (1 - q_no_object) ** reweight_gamma`` (``KD_REW``), or a
    plain mean when ``reweight_gamma`` is None. Gradients reach both inputs as in the official
    (the old model there runs without gradient); all-no-object old queries with a reweighting
    give 0/0 = nan, as official.

    Args:
        new_logits: ``(B, Q, Kn + 1)``, classes ``0 .. Ko - 1`` the old ones, no-object last.
        old_logits: ``(B, Q, Ko + 1)`` of the old model, no-object last; ``Ko <= Kn``.
        alpha: ``CONT.DIST.ALPHA``, multiplies the old logits only (1 in CoMFormer).
        reweight_gamma: 2.0 with ``KD_REW`` (the official default), None for a plain mean.

    Returns:
        0-dim tensor.
    """
    if new_logits.shape[:2] != old_logits.shape[:2] or old_logits.shape[-1] > new_logits.shape[-1]:
        raise ValueError(
            f"new logits {tuple(new_logits.shape)} and old logits {tuple(old_logits.shape)} "
            "must share (B, Q), with no more old classes than new ones"
        )
    num_old = old_logits.shape[-1] - 1
    # (B, C, Q) and reductions over dim 1, as the official is called (set_criterion.py:78).
    new = new_logits.transpose(1, 2)
    old = old_logits.transpose(1, 2) * alpha
    den = torch.logsumexp(new, dim=1)
    log_p_old = new[:, :num_old] - den.unsqueeze(dim=1)
    log_p_rest = torch.logsumexp(new[:, num_old:], dim=1) - den
    q = torch.softmax(old, dim=1)
    log_q = torch.log_softmax(old, dim=1)
    rest_term = q[:, -1] * (log_q[:, -1] - log_p_rest)
    loss = rest_term + (q[:, :-1] * (log_q[:, :-1] - log_p_old)).sum(dim=1)
    if reweight_gamma is None:
        return loss.mean()
    # Old no-object queries carry little knowledge: weigh each by its old objectness.
    weight = (1 - q[:, -1]) ** reweight_gamma
    return (weight * loss).sum() / weight.sum()


@dataclass(frozen=True)
class CoMFormerWeights:
    """Loss weights and settings of CoMFormer's ``SoftmaxKDSetCriterion``.

    ``class/mask/dice_weight`` from the ADE20K yaml (maskformer2_R50_bs16_160k.yaml:23-25),
    ``focal_*`` from mask2former/config.py:38-39, ``kd_alpha`` = ``CONT.DIST.ALPHA``,
    ``kd_reweight_gamma`` = loss.py:90's default with ``KD_REW`` (None = no reweighting).
    ``kd_weight`` (``CONT.DIST.KD_WEIGHT``) is 10 as README.md:30 and scripts/ade10.sh:18,
    ade5.sh:20 (100-10, 100-5); scripts/ade.sh:17 uses 0.5 for 100-50. Points and ratios from
    the yaml:36-38; ``deep_supervision`` adds the aux-layer losses (yaml:21).

    ``uce`` (``CONT.DIST.UCE``, MiB: README.md:32-33) makes the class loss of every prediction,
    final and aux, :func:`unbiased_focal_ce` over the ``num_old_classes`` given to
    :func:`comformer_criterion`; with 0 old classes it changes nothing (set_criterion.py:31).
    """

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    kd_weight: float = 10.0
    focal_alpha: float = 5.0
    focal_gamma: float = 1.0
    kd_alpha: float = 1.0
    kd_reweight_gamma: float | None = 2.0
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True
    uce: bool = False


def _focal_labels(
    pred_logits: torch.Tensor,
    targets: Targets,
    indices: Indices,
    weights: CoMFormerWeights,
    num_old_classes: int,
) -> torch.Tensor:
    """Focal CE, or with ``uce`` and old classes the unbiased focal CE; unmatched queries
    target no-object ``K`` (set_criterion.py:50-68)."""
    logits = pred_logits.float()
    num_classes = logits.shape[-1] - 1
    classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device)
    classes[matched_queries(indices)] = torch.cat(
        [t["labels"][j] for t, (_, j) in zip(targets, indices)]
    ).to(classes)
    # ``self.uce = uce and old_classes != 0`` (set_criterion.py:31), then :60-62 or :66-68.
    if weights.uce and num_old_classes != 0:
        return unbiased_focal_ce(
            logits.transpose(1, 2),
            classes,
            num_old_classes,
            weights.focal_alpha,
            weights.focal_gamma,
        )
    return focal_ce(logits.transpose(1, 2), classes, weights.focal_alpha, weights.focal_gamma)


def comformer_criterion(
    outputs: dict,
    targets: Targets,
    num_old_classes: int,
    old_logits: torch.Tensor | None,
    weights: CoMFormerWeights = CoMFormerWeights(),
    generator: torch.Generator | None = None,
    mean_over_processes: Callable[[torch.Tensor], torch.Tensor] = one_process,
) -> dict[str, torch.Tensor]:
    """CoMFormer's unweighted losses (``SoftmaxKDSetCriterion.forward``, set_criterion.py:156-197).

    For the final output, then each ``aux_outputs[i]`` in order (with ``deep_supervision``):
    softmax matching (its own), focal CE of all queries (matched: their target's class, others:
    no-object ``K``; no no-object weight), softmax mask CE and dice. ``loss_kd`` (UKD) only on
    the final output and only if ``old_logits`` is given (``KD_DEEP False``). With
    ``weights.uce`` and ``num_old_classes > 0`` the class loss of every output, aux included, is
    :func:`unbiased_focal_ce` (MiB; ``loss_labels`` runs for each output, set_criterion.py:
    181-195, whatever ``KD_DEEP``); it does not need ``old_logits``. Random points are drawn in
    the official order: matcher, then mask losses, output by output.

    Args:
        outputs: ``{"pred_logits": (B, Q, K + 1), "pred_masks": (B, Q, H, W),
            "aux_outputs": optional list of dicts with the same two keys}``.
        targets: ``B`` dicts ``labels`` ``(n_i,)`` int64 in ``[0, K)`` (pseudo-labels
            included), ``masks`` ``(n_i, H_i, W_i)``.
        num_old_classes: ``Ko``; checked against ``old_logits`` (``(B, Q, Ko + 1)``), and
            the classes merged with no-object by ``uce``. 0 at the first step, where ``uce``
            then changes nothing. The official has ``old_classes = -1`` there
            (continual/method_wrapper/base.py:15, no background class), which its guard
            (set_criterion.py:31) lets through, so ``UCE True`` at step 0 would merge every
            class into no-object there; its scripts start step 1 from the plain mask-based
            step-0 model (scripts/ade.sh:15, adps.sh:14), so that case is not reproduced.
        old_logits: the old model's final ``pred_logits``, or None (first step, no KD).
        weights: focal, KD and point-sampling settings.
        generator: optional generator on the masks' device; None = global (as official).
        mean_over_processes: maps the ``(1,)`` float count of target masks to its mean over
            processes (official: ``all_reduce`` then ``/ world_size``); identity = one process.

    Returns:
        Dict of 0-dim tensors ``loss_ce, [loss_kd,] loss_mask, loss_dice, loss_ce_0, ...``.
    """
    if old_logits is not None and old_logits.shape[-1] != num_old_classes + 1:
        raise ValueError(
            f"old_logits have {old_logits.shape[-1]} classes, expected {num_old_classes} + 1"
        )
    count = float(sum(len(t["labels"]) for t in targets))
    count = torch.as_tensor([count], dtype=torch.float, device=outputs["pred_logits"].device)
    num_masks = torch.clamp(mean_over_processes(count), min=1).item()
    stages = [("", outputs)]
    if weights.deep_supervision:
        stages += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
    losses = {}
    for suffix, out in stages:
        indices = softmax_matcher(
            out["pred_logits"], out["pred_masks"], targets, weights.num_points, generator
        )
        stage = {
            "loss_ce": _focal_labels(out["pred_logits"], targets, indices, weights, num_old_classes)
        }
        if suffix == "" and old_logits is not None:
            stage["loss_kd"] = unbiased_kd(
                out["pred_logits"].float(),
                old_logits.float(),
                weights.kd_alpha,
                weights.kd_reweight_gamma,
            )
        stage.update(
            softmax_mask_losses(
                out["pred_masks"],
                indices,
                targets,
                num_masks,
                weights.num_points,
                weights.oversample_ratio,
                weights.importance_sample_ratio,
                generator,
            )
        )
        losses.update({key + suffix: value for key, value in stage.items()})
    return losses


def loss_weight_dict(weights: CoMFormerWeights, dec_layers: int) -> dict[str, float]:
    """The official ``weight_dict`` (maskformer.py:64-73) without its unused terms.

    ``loss_mask_kd`` and ``loss_pod`` are left out: CoMFormer sets both weights to 0 and the
    criterion makes neither. Aux keys ``_0 .. _{dec_layers - 2}`` with ``deep_supervision``.
    """
    base = {
        "loss_ce": weights.class_weight,
        "loss_mask": weights.mask_weight,
        "loss_dice": weights.dice_weight,
        "loss_kd": weights.kd_weight,
    }
    return expand_weights(base, dec_layers, weights.deep_supervision)


def weighted_total(losses: dict[str, torch.Tensor], weights: CoMFormerWeights) -> torch.Tensor:
    """Sum of weighted losses: ce 2, mask 5, dice 5, kd ``kd_weight`` (maskformer.py:178-185).

    Keys without a weight are dropped, as official; the trainer sums the values in order.
    ``DEC_LAYERS`` is taken as 1 + the number of aux sets in ``losses``.
    """
    return weighted_sum(losses, loss_weight_dict(weights, aux_count(losses) + 1))


def targets_from_label_map(label: torch.Tensor, ignore: int = 255) -> dict[str, torch.Tensor]:
    """CoMFormer's targets of one label map: background dropped, classes shifted down by one.

    mask_former_semantic_dataset_mapper.py:164-186 (``remove_bkg``) then maskformer.py:160-163
    (``labels -= 1``). ``label`` ``(H, W)`` integer, 0 = background, ``ignore`` unlabelled.
    Returns ``{"labels": (n,) int64 in [0, K), "masks": (n, H, W) bool}``, labels ascending.
    """
    target = masks_from_labels(label, ignore=ignore)
    keep = target["labels"] != 0
    return {"labels": target["labels"][keep] - 1, "masks": target["masks"][keep]}


@torch.no_grad()
def pseudo_labels(
    old_pred_logits: torch.Tensor,
    old_pred_masks: torch.Tensor,
    target: dict[str, torch.Tensor],
    threshold: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Old-class masks of the old model appended to one image's target (maskformer.py:98-146).

    Queries whose top class is not no-object (``Ko``) with score ``> threshold`` are kept;
    every pixel goes to the kept query with the largest ``score * p`` (``p`` softmaxed over
    *all* queries), except ground-truth pixels, which no query gets. A query's pseudo-mask is
    its pixels with ``p >= 0.5``; it is added only if non-empty and its pixel count (``p`` not
    thresholded) is ``> 0.5 *`` the count of its ``p >= 0.5`` pixels. The official's
    ``F.interpolate(masks, size, mode="bilinear", align_corners=False)`` to the image size is
    left to the caller.

    Args:
        old_pred_logits: ``(Q, Ko + 1)`` the old model's final class logits, no-object last.
        old_pred_masks: ``(Q, H, W)`` its mask logits, already upsampled to the label size.
        target: ``{"labels": (n,) int64, "masks": (n, H, W)}``, not modified.
        threshold: ``PSEUDO_THRESHOLD`` (0.0).

    Returns:
        A new dict; pseudo-labels (int64 classes < Ko, bool masks) follow the ground truth,
        in query order. The mask dtype follows ``torch.cat``'s promotion.
    """
    if old_pred_masks.shape[-2:] != target["masks"].shape[-2:]:
        raise ValueError(
            f"old masks {tuple(old_pred_masks.shape[-2:])} and target masks "
            f"{tuple(target['masks'].shape[-2:])} differ in size; upsample the old masks first"
        )
    num_old = old_pred_logits.shape[-1] - 1
    scores, classes = F.softmax(old_pred_logits, dim=-1).max(-1)
    probs = old_pred_masks.softmax(dim=0)
    keep = classes.ne(num_old) & (scores > threshold)
    scores, classes, probs = scores[keep], classes[keep], probs[keep]
    gt_pixels = target["masks"].sum(dim=0).bool()
    chosen, masks = [], []
    if probs.shape[0] > 0:
        owner = (scores.view(-1, 1, 1) * probs).argmax(0)
        owner[gt_pixels] = -1  # ground truth wins: no query owns those pixels
        for k in range(classes.shape[0]):
            owned = owner == k
            confident = probs[k] >= MASK_THRESHOLD
            pseudo = owned & confident
            # A non-empty ``pseudo`` implies both areas > 0, the official's other two checks.
            if pseudo.any() and owned.sum().item() / confident.sum().item() > 0.5:
                chosen.append(k)
                masks.append(pseudo)
    if not chosen:
        return {"labels": target["labels"], "masks": target["masks"]}
    pseudo_classes = classes[torch.as_tensor(chosen, device=classes.device)]
    return {
        "labels": torch.cat((target["labels"], pseudo_classes)),
        "masks": torch.cat((target["masks"], torch.stack(masks))),
    }


def mask2former_pod(
    old_maps: list[torch.Tensor], new_maps: list[torch.Tensor], scales: tuple[int, ...] = (1, 2, 4)
) -> torch.Tensor:
    """PLOP's local POD as CoMFormer's code applies it to Mask2Former (``continual/modeling/
    pod.py:5-20``, called by ``continual/method_wrapper/maskformer.py:11-20`` on res2-res5 and
    the pixel decoder's ``mask_features`` with scales 1, 2, 4):
    ``mean_b sum_l ||phi(new_l)_b - phi(old_l)_b||_2 / L`` with ``phi`` the local POD embedding
    (:func:`incseg.losses.local_pod_embedding`, the same pooling as ``pod.py:23-38``). Unlike
    PLOP's own (:func:`incseg.losses.local_pod`) the maps are not squared first and no factor
    weighs a layer. Computed in float32; the old maps are detached.

    Args:
        old_maps, new_maps: matching ``(B, C_l, h_l, w_l)`` maps, square (the recipe's crops are).

    Returns:
        Scalar.
    """
    if len(old_maps) != len(new_maps) or not old_maps:
        raise ValueError("mask2former_pod: as many old maps as new maps are needed (at least 1)")
    total = torch.zeros((), device=new_maps[0].device)
    for old, new in zip(old_maps, new_maps, strict=True):
        old_emb = local_pod_embedding(old.detach().float(), scales)
        new_emb = local_pod_embedding(new.float(), scales)
        total = total + torch.linalg.vector_norm(new_emb - old_emb, dim=-1)
    return total.mean() / len(new_maps)


def _inference_one(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    object_threshold: float,
    overlap: float,
    sigmoid: bool = False,
) -> torch.Tensor:
    """One image's ``(H, W)`` label map (maskformer_model.py:333, 342-374)."""
    num_classes = mask_cls.shape[-1] - 1
    if sigmoid:  # ECLIPSE: SOFTMASK False, SOFTCLS False (its maskformer_model.py:373, 385)
        probs, (scores, classes) = mask_pred.sigmoid(), mask_cls.sigmoid().max(-1)
    else:
        probs, (scores, classes) = mask_pred.softmax(dim=0), F.softmax(mask_cls, dim=-1).max(-1)
    keep = classes.ne(num_classes) & (scores > object_threshold)
    scores, classes, probs = scores[keep], classes[keep], probs[keep]
    semseg = torch.zeros(mask_pred.shape[-2:], dtype=torch.long, device=mask_pred.device)
    if probs.shape[0] == 0:
        return semseg
    owner = (scores.view(-1, 1, 1) * probs).argmax(0)
    for k in range(classes.shape[0]):
        owned = owner == k
        confident = probs[k] >= MASK_THRESHOLD
        painted = owned & confident
        # A non-empty ``painted`` implies both areas > 0, the official's other two checks.
        if painted.any():
            if owned.sum().item() / confident.sum().item() < overlap:
                continue
            semseg[painted] = classes[k] + 1  # index 0 is "nothing painted"
    return semseg


@torch.no_grad()
def comformer_inference(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    object_threshold: float = 0.0,
    overlap_threshold: float = 0.0,
    sigmoid: bool = False,
) -> torch.Tensor:
    """CoMFormer's semantic inference (maskformer_model.py:332-376, softmask, not mask_bg);
    with ``sigmoid``, ECLIPSE's (clovaai/ECLIPSE ``mask2former/maskformer_model.py:372-420``:
    class scores ``sigmoid`` over every column, no-object included, masks ``sigmoid``).

    Per image: masks softmaxed over all queries; queries whose top class is not no-object with
    score ``> object_threshold`` are kept; each pixel goes to the kept query with the largest
    ``score * p``; a query paints its pixels with ``p >= 0.5``, unless its pixel count is
    ``< overlap_threshold *`` its ``p >= 0.5`` count.

    Index convention: logit class ``k`` is painted as ``k + 1``, and 0 means nothing was painted
    (background). The official returns the one-hot float map of this, ``K + 1`` channels
    (:func:`one_hot_scores`), resized by detectron2's ``sem_seg_postprocess``; the caller
    upsamples ``pred_masks`` to the padded image size first (maskformer_model.py:202-207).

    Args:
        pred_logits: ``(B, Q, K + 1)`` class logits, no-object last.
        pred_masks: ``(B, Q, H, W)`` mask logits.
        object_threshold: ``TEST.OBJECT_MASK_THRESHOLD`` (0.0).
        overlap_threshold: ``TEST.OVERLAP_THRESHOLD`` (0.0: no query is skipped).

    Returns:
        ``(B, H, W)`` int64 in ``[0, K]``.
    """
    maps = [
        _inference_one(logits, masks, object_threshold, overlap_threshold, sigmoid)
        for logits, masks in zip(pred_logits, pred_masks)
    ]
    return torch.stack(maps)


def one_hot_scores(semseg: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The official's output form: ``(B, H, W)`` labels -> ``(B, K + 1, H, W)`` float one-hot.

    ``num_classes`` is ``K`` (without no-object); channel 0 is "nothing painted", channel
    ``k + 1`` logit class ``k`` (maskformer_model.py:357, 375).
    """
    return F.one_hot(semseg, num_classes + 1).float().permute(0, 3, 1, 2)
