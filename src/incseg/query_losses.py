"""Mask2Former's bipartite matcher, set criterion and semantic inference as pure functions.

Mask-classification models predict ``Q`` queries per image, each a class distribution over
``K + 1`` classes (index ``K`` = "no object") and a mask logit map. Training matches queries
to the ground-truth masks one-to-one (Hungarian matching on a class + mask cost), then applies
cross-entropy on the classes and sigmoid-BCE + dice on point-sampled masks. These functions
restate that math without detectron2 or ``nn.Module`` state; the numbers are the official ones.

Reference: facebookresearch/Mask2Former at 9b0651c (file:line below are at that commit):

* ``mask2former/modeling/matcher.py:15-156`` - pairwise costs, ``HungarianMatcher``;
* ``mask2former/modeling/criterion.py:21-247`` - losses, ``SetCriterion``;
* ``mask2former/maskformer_model.py:101-138`` (weights), ``:209-217`` (weighting),
  ``:264-278`` (``prepare_targets``), ``:280-284`` (``semantic_inference``);
* ``mask2former/data/dataset_mappers/mask_former_semantic_dataset_mapper.py:160-182``;
* detectron2 ``projects/PointRend/point_rend/point_features.py:19-42, 63-116`` (02b5c4e);
* defaults: ``configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml:21-38``.

Conventions: ``pred_logits`` ``(B, Q, K + 1)`` float, no-object is the last index ``K``;
``pred_masks`` ``(B, Q, H, W)`` float mask logits; targets are a list of ``B`` dicts
``{"labels": (n_i,) int64 in [0, K), "masks": (n_i, H_i, W_i) bool or float in {0, 1}}``.

Randomness: the official draws every point from the global generator of the logits' device
(``torch.rand`` without a generator). Each function here takes an optional ``generator``; with
``None`` it draws the same numbers, in the same order, from that same global generator. A
generator that is passed must live on the logits' device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

Targets = list[dict[str, torch.Tensor]]
Indices = list[tuple[torch.Tensor, torch.Tensor]]


def point_sample(
    input: torch.Tensor, point_coords: torch.Tensor, align_corners: bool = False
) -> torch.Tensor:
    """Bilinearly sample ``input`` at normalized points (detectron2 point_features.py:19-42).

    Args:
        input: ``(N, C, H, W)`` float feature map.
        point_coords: ``(N, P, 2)`` or ``(N, Hg, Wg, 2)`` with ``(x, y)`` in ``[0, 1]``.
        align_corners: passed to ``F.grid_sample``; Mask2Former always uses False.

    Returns:
        ``(N, C, P)`` for 3-D coordinates, else ``(N, C, Hg, Wg)``; dtype of ``input``.
    """
    # grid_sample wants a 4-D grid in [-1, 1]; a point list is a P x 1 grid.
    flat = point_coords.dim() == 3
    grid = point_coords.unsqueeze(2) if flat else point_coords
    output = F.grid_sample(input, 2.0 * grid - 1.0, align_corners=align_corners)
    return output.squeeze(3) if flat else output


def uncertain_point_coords(
    coarse_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
    uncertainty: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """PointRend's importance sampling with Mask2Former's uncertainty ``-|logit|`` (or
    ``uncertainty`` of the sampled values: CoMFormer's ``-|2p - 1|`` of probabilities).

    detectron2 point_features.py:63-116 (``get_uncertain_point_coords_with_randomness``) with
    the uncertainty of Mask2Former criterion.py:73-87 (``calculate_uncertainty``). Draws
    ``int(num_points * oversample_ratio)`` uniform points per mask, keeps the
    ``int(importance_sample_ratio * num_points)`` whose sampled logit is closest to 0, and fills
    the rest with fresh uniform points. Two ``torch.rand`` calls, in the official order; with
    ``generator=None`` they use the global generator as the official does.

    Args:
        coarse_logits: ``(N, 1, H, W)`` float mask logits.
        num_points: P, points returned per mask.
        oversample_ratio: >= 1.
        importance_sample_ratio: in ``[0, 1]``.
        generator: optional generator on ``coarse_logits.device``.
        uncertainty: of the sampled values, higher = more uncertain (None: ``-|x|``).

    Returns:
        ``(N, P, 2)`` coordinates in ``[0, 1]``, default float dtype.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
        )
    num_masks, device = coarse_logits.shape[0], coarse_logits.device
    num_sampled = int(num_points * oversample_ratio)
    candidates = torch.rand(num_masks, num_sampled, 2, device=device, generator=generator)
    # Uncertainty is taken on the interpolated values, not interpolated from per-pixel values.
    sampled = point_sample(coarse_logits, candidates, align_corners=False)
    scores = -sampled.abs() if uncertainty is None else uncertainty(sampled)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    top = torch.topk(scores[:, 0, :], k=num_uncertain, dim=1)[1]
    coords = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        extra = torch.rand(num_masks, num_random, 2, device=device, generator=generator)
        coords = torch.cat([coords, extra], dim=1)
    return coords


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Sum over masks of ``1 - (2|p t| + 1) / (|p| + |t| + 1)``, divided by ``num_masks``.

    criterion.py:21-40. ``inputs`` ``(N, P)`` logits (sigmoid applied here), ``targets``
    ``(N, P)`` in ``[0, 1]``. Returns a 0-dim tensor.
    """
    probs = inputs.sigmoid().flatten(1)
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Per-mask mean binary cross-entropy with logits, summed, divided by ``num_masks``.

    criterion.py:48-65. ``inputs`` ``(N, P)`` logits, ``targets`` ``(N, P)`` in ``[0, 1]``.
    Returns a 0-dim tensor.
    """
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss between every prediction and every target (matcher.py:15-30).

    ``inputs`` ``(N, P)`` logits, ``targets`` ``(M, P)`` in ``[0, 1]``. Returns ``(N, M)``.
    """
    probs = inputs.sigmoid().flatten(1)
    numerator = 2 * torch.einsum("nc,mc->nm", probs, targets)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits between every prediction and every target (matcher.py:38-62).

    ``inputs`` ``(N, P)`` logits, ``targets`` ``(M, P)`` in ``[0, 1]``. Returns ``(N, M)``.
    """
    num_points = inputs.shape[1]
    # BCE is linear in the target, so the pairwise matrix is two matrix products.
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    cost = torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, 1 - targets)
    return cost / num_points


@dataclass(frozen=True)
class MatcherWeights:
    """``HungarianMatcher`` arguments (maskformer_model.py:111-116); ADE20K config defaults."""

    cost_class: float = 2.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0
    num_points: int = 12544


def _match_cost(
    logits: torch.Tensor,
    masks: torch.Tensor,
    target: dict[str, torch.Tensor],
    weights: MatcherWeights,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One image's ``(Q, n)`` matching cost on CPU (matcher.py:105-149)."""
    # 1 - p[target class] without the constant 1, which does not change the assignment.
    cost_class = -logits.softmax(-1)[:, target["labels"]]
    masks = masks[:, None]
    target_masks = target["masks"].to(masks)[:, None]
    # One set of points for all predictions and targets, so costs are comparable.
    coords = torch.rand(1, weights.num_points, 2, device=masks.device, generator=generator)
    target_points = point_sample(
        target_masks, coords.repeat(target_masks.shape[0], 1, 1), align_corners=False
    ).squeeze(1)
    points = point_sample(masks, coords.repeat(masks.shape[0], 1, 1), align_corners=False)
    points = points.squeeze(1)
    # The official turns autocast off here so the mask costs are float32 under AMP.
    with torch.autocast(device_type=masks.device.type, enabled=False):
        points, target_points = points.float(), target_points.float()
        cost_mask = batch_sigmoid_ce_cost(points, target_points)
        cost_dice = batch_dice_cost(points, target_points)
    cost = (
        weights.cost_mask * cost_mask
        + weights.cost_class * cost_class
        + weights.cost_dice * cost_dice
    )
    return cost.reshape(logits.shape[0], -1).cpu()


@torch.no_grad()
def hungarian_match(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    targets: Targets,
    weights: MatcherWeights = MatcherWeights(),
    generator: torch.Generator | None = None,
) -> Indices:
    """Minimum-cost one-to-one assignment of queries to target masks, per image.

    matcher.py:95-156 (``HungarianMatcher.memory_efficient_forward``): cost
    ``cost_mask * BCE + cost_class * (-p[class]) + cost_dice * dice`` on ``num_points`` uniform
    points shared by all predictions and targets of an image (one ``torch.rand`` per image, in
    batch order), solved by ``scipy.optimize.linear_sum_assignment``. No gradient.

    Args:
        pred_logits: ``(B, Q, K + 1)`` class logits.
        pred_masks: ``(B, Q, H, W)`` mask logits.
        targets: ``B`` dicts with ``labels`` ``(n_i,)`` int64 and ``masks`` ``(n_i, H, W)``.
        weights: cost weights and number of points.
        generator: optional generator on the masks' device; None = global (as official).

    Returns:
        ``B`` pairs ``(query_idx, target_idx)`` of int64 CPU tensors of length
        ``min(Q, n_i)``, ``query_idx`` increasing.
    """
    return [
        assign(_match_cost(pred_logits[b], pred_masks[b], targets[b], weights, generator))
        for b in range(pred_logits.shape[0])
    ]


def assign(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimal-cost one-to-one assignment of a ``(Q, n)`` CPU cost matrix
    (``scipy.optimize.linear_sum_assignment``, as both official matchers): int64 query and
    target indices, ``min(Q, n)`` of each, queries increasing."""
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


@dataclass(frozen=True)
class CriterionWeights:
    """``SetCriterion`` and matcher settings (maskformer_model.py:101-138); ADE20K defaults.

    The matcher's costs are the loss weights (maskformer_model.py:111-116).
    """

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True

    def matcher_weights(self) -> MatcherWeights:
        """The matcher built from these weights (maskformer_model.py:111-116)."""
        return MatcherWeights(
            self.class_weight, self.mask_weight, self.dice_weight, self.num_points
        )


def matched_queries(indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, query) of every matched pair, images in order (criterion.py:192-196)."""
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for src, _ in indices])


def labels_loss(
    pred_logits: torch.Tensor, targets: Targets, indices: Indices, num_classes: int, eos: float
) -> torch.Tensor:
    """Weighted CE; unmatched queries target no-object ``K`` (criterion.py:113-115, 122-138)."""
    logits = pred_logits.float()
    matched = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
    classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device)
    classes[matched_queries(indices)] = matched
    empty_weight = torch.ones(num_classes + 1, device=logits.device)
    empty_weight[-1] = eos
    return F.cross_entropy(logits.transpose(1, 2), classes, empty_weight)


def matched_target_masks(targets: Targets, indices: Indices, like: torch.Tensor) -> torch.Tensor:
    """Matched target masks ``(N, H_max, W_max)``, zero-padded bottom/right, dtype of ``like``.

    Official pads all masks into one batch tensor of the first mask's dtype
    (utils/misc.py:48-70), then casts and indexes (criterion.py:150-154); padding only the
    matched masks gives the same values.
    """
    height = max(t["masks"].shape[-2] for t in targets)
    width = max(t["masks"].shape[-1] for t in targets)
    dtype = targets[0]["masks"].dtype
    selected = []
    for t, (_, j) in zip(targets, indices):
        masks = t["masks"][j]
        padded = torch.zeros((masks.shape[0], height, width), dtype=dtype, device=masks.device)
        padded[:, : masks.shape[-2], : masks.shape[-1]].copy_(masks)
        selected.append(padded)
    return torch.cat(selected).to(like)


def masks_loss(
    pred_masks: torch.Tensor,
    targets: Targets,
    indices: Indices,
    num_masks: float,
    weights: CriterionWeights,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """Point-sampled BCE and dice of matched masks (criterion.py:140-190)."""
    src = pred_masks[matched_queries(indices)][:, None]
    tgt = matched_target_masks(targets, indices, src)[:, None]
    # Points are chosen from the predictions but carry no gradient, as official.
    with torch.no_grad():
        coords = uncertain_point_coords(
            src,
            weights.num_points,
            weights.oversample_ratio,
            weights.importance_sample_ratio,
            generator=generator,
        )
        labels = point_sample(tgt, coords, align_corners=False).squeeze(1)
    logits = point_sample(src, coords, align_corners=False).squeeze(1)
    return {
        "loss_mask": sigmoid_ce_loss(logits, labels, num_masks),
        "loss_dice": dice_loss(logits, labels, num_masks),
    }


def one_process(x: torch.Tensor) -> torch.Tensor:
    """One process: the official's ``all_reduce`` then ``/ world_size`` with world size 1."""
    return x


def set_criterion(
    outputs: dict,
    targets: Targets,
    num_classes: int,
    weights: CriterionWeights = CriterionWeights(),
    num_masks: float | None = None,
    generator: torch.Generator | None = None,
    mean_over_processes: Callable[[torch.Tensor], torch.Tensor] = one_process,
    class_loss: Callable[..., torch.Tensor] = labels_loss,
) -> dict[str, torch.Tensor]:
    """Mask2Former's unweighted set losses (criterion.py:212-247, ``SetCriterion.forward``).

    For the final output, then each ``outputs["aux_outputs"][i]`` in order: match (its own
    Hungarian matching), ``loss_ce`` (CE over ``K + 1`` classes, no-object weighted by
    ``no_object_weight``, unmatched queries labelled ``K``), then ``loss_mask`` and
    ``loss_dice`` on importance-sampled points. Aux keys get the suffix ``_i``. Aux losses are
    computed whenever ``aux_outputs`` is present, as official; ``deep_supervision`` only
    affects ``weighted_total``. Random draws happen in the official order.

    Args:
        outputs: ``{"pred_logits": (B, Q, K + 1), "pred_masks": (B, Q, H, W),
            "aux_outputs": optional list of dicts with the same two keys}``.
        targets: ``B`` dicts ``labels`` ``(n_i,)`` int64, ``masks`` ``(n_i, H_i, W_i)``;
            masks of different sizes are zero-padded bottom/right (utils/misc.py:48-70).
        num_classes: K, without the no-object class.
        weights: loss, matcher and point-sampling settings.
        num_masks: replaces this process's target count ``sum(n_i)`` if given; the
            normalizer is then ``max(mean_over_processes(count), 1)`` (criterion.py:225-231).
        generator: optional generator on the masks' device; None = global (as official).
        mean_over_processes: maps the ``(1,)`` float count tensor to its mean over processes;
            official is ``all_reduce`` (sum) then ``/ world_size``. Identity = one process.
        class_loss: ``loss_ce`` as ``class_loss(pred_logits, targets, indices, num_classes,
            no_object_weight)`` (default :func:`labels_loss`; ECLIPSE's sigmoid focal loss,
            :func:`incseg.eclipse_losses.sigmoid_focal_labels_loss`).

    Returns:
        Dict of 0-dim tensors ``loss_ce, loss_mask, loss_dice, loss_ce_0, ...``, unweighted.
    """
    count = sum(len(t["labels"]) for t in targets) if num_masks is None else num_masks
    count = torch.as_tensor([count], dtype=torch.float, device=outputs["pred_logits"].device)
    normalizer = torch.clamp(mean_over_processes(count), min=1).item()
    matcher_weights = weights.matcher_weights()
    stages = [("", outputs)]
    stages += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
    losses = {}
    for suffix, out in stages:
        indices = hungarian_match(
            out["pred_logits"], out["pred_masks"], targets, matcher_weights, generator=generator
        )
        stage = {
            "loss_ce": class_loss(
                out["pred_logits"], targets, indices, num_classes, weights.no_object_weight
            )
        }
        stage.update(
            masks_loss(out["pred_masks"], targets, indices, normalizer, weights, generator)
        )
        losses.update({key + suffix: value for key, value in stage.items()})
    return losses


def expand_weights(
    base: dict[str, float], dec_layers: int, deep_supervision: bool = True
) -> dict[str, float]:
    """An official ``weight_dict``: ``base`` for the final prediction and, with deep
    supervision, the same weights under the keys ``_0 .. _{dec_layers - 2}`` of the earlier
    predictions (maskformer_model.py:118-125)."""
    result = dict(base)
    if deep_supervision:
        for i in range(dec_layers - 1):
            result.update({key + f"_{i}": value for key, value in base.items()})
    return result


def weighted_sum(losses: dict[str, torch.Tensor], weight_dict: dict[str, float]) -> torch.Tensor:
    """Each loss times its ``weight_dict`` entry, keys without one dropped, summed in order
    (maskformer_model.py:209-217 and detectron2's trainer)."""
    return sum(value * weight_dict[key] for key, value in losses.items() if key in weight_dict)


def aux_count(losses: dict[str, torch.Tensor]) -> int:
    """The earlier predictions a criterion's losses hold (``loss_ce_0``, ``loss_ce_1``, ...)."""
    return sum(1 for key in losses if key.startswith("loss_ce_"))


def loss_weight_dict(weights: CriterionWeights, dec_layers: int) -> dict[str, float]:
    """The official ``weight_dict`` (maskformer_model.py:118-125).

    ``dec_layers`` is ``DEC_LAYERS`` (10 for ADE20K), i.e. one more than the number of aux
    outputs; aux keys ``_0 .. _{dec_layers - 2}`` are present only with deep supervision.
    """
    base = {
        "loss_ce": weights.class_weight,
        "loss_mask": weights.mask_weight,
        "loss_dice": weights.dice_weight,
    }
    return expand_weights(base, dec_layers, weights.deep_supervision)


def weighted_total(losses: dict[str, torch.Tensor], weights: CriterionWeights) -> torch.Tensor:
    """Sum of weighted losses, as ``MaskFormer.forward`` and detectron2's trainer compute it.

    maskformer_model.py:209-217 multiplies each loss by its ``weight_dict`` entry and drops
    keys without one (the aux losses when ``deep_supervision`` is False); the trainer sums the
    dict's values in order. ``DEC_LAYERS`` is taken as 1 + the number of aux sets in
    ``losses``, as in the official decoder (mask2former_transformer_decoder.py:451-461).
    """
    return weighted_sum(losses, loss_weight_dict(weights, aux_count(losses) + 1))


def masks_from_labels(label: torch.Tensor, ignore: int = 255) -> dict[str, torch.Tensor]:
    """Per-class binary targets of a label map (mask_former_semantic_dataset_mapper.py:160-182).

    Args:
        label: ``(H, W)`` integer class map; ``ignore`` marks unlabelled pixels.
        ignore: the dataset's ignore label (255 for ADE20K, yaml:6 ``IGNORE_VALUE``).

    Returns:
        ``{"labels": (n,) int64 sorted ascending, "masks": (n, H, W) bool}``: one mask per
        class present, ignore excluded; ``n = 0`` gives ``(0, H, W)`` masks.
    """
    classes = torch.unique(label, sorted=True)
    classes = classes[classes != ignore].to(torch.int64)
    masks = label.unsqueeze(0) == classes.to(label.dtype)[:, None, None]
    return {"labels": classes, "masks": masks}


def semantic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """Per-class scores ``sum_q p_q(c) * sigmoid(m_q)`` (maskformer_model.py:280-284).

    Args:
        pred_logits: ``(B, Q, K + 1)``; the no-object column ``K`` is dropped after softmax.
        pred_masks: ``(B, Q, H, W)`` mask logits.

    Returns:
        ``(B, K, H, W)`` float scores (not normalized over classes); argmax over ``K`` gives
        the segmentation. The official does one image at a time; batching adds no math.
    """
    probs = F.softmax(pred_logits, dim=-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", probs, pred_masks.sigmoid())
