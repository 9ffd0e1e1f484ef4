"""SimCIS's matcher, criterion, pseudo-labels and inference as pure functions.

SimCIS (Zhu et al., CVPR 2025; SooLab/SimCIS 28bc91e) trains its query-selection decoder
(:mod:`incseg.models.mask2former.selection`) with a sigmoid focal class loss, Mask2Former's
point-sampled mask losses and, on the boxes of the masks, an L1 and a GIoU loss, at every
layer and at the selected tokens' own prediction; at steps > 0 the old model adds pseudo
targets and two KL terms on its selected positions. Files cited below are of that repository:
``criterion.py`` = ``mask2former/modeling/criterion.py``, ``matcher.py`` =
``mask2former/modeling/matcher.py``, ``model.py`` = ``mask2former/maskformer_model.py``,
``box_ops.py`` = ``mask2former/utils/box_ops.py``.

Conventions: ``pred_logits`` ``(B, Q, C)`` over every class of the setting (SimCIS's static
head: no no-object column); ``pred_masks`` ``(B, Q, H, W)`` logits; ``pred_boxes`` ``(B, Q, 4)``
``(cx, cy, w, h)`` in [0, 1]; targets ``{"labels": (n,) int64, "masks": (n, H, W)}``, their boxes
computed here from the masks (:func:`target_boxes`) as the official mapper does
(``continual/continual_semantic_dataset_mapper.py:203``, ``model.py:430-447``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from incseg.query_losses import (
    CriterionWeights,
    Indices,
    Targets,
    assign,
    batch_dice_cost,
    batch_sigmoid_ce_cost,
    masks_loss,
    matched_queries,
    one_process,
    point_sample,
)

FOCAL_ALPHA = 0.25  # SetCriterion.focal_alpha (criterion.py:155) and the matcher's (matcher.py:124)
FOCAL_GAMMA = 2.0
GIOU_WEIGHT = 2.0  # "loss_giou" (model.py:160) and the matcher's cost_giou (matcher.py:91)
SCORE_THRESHOLD = 0.4  # semantic_inference's keep (model.py:555)
TEMPERATURE = 0.06  # T of the inference's softmax (model.py:559)
OVERLAP_THRESHOLD = 0.8  # MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD and CONT.PSD_OVERLAP_THRESHOLD


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``box_ops.py:9-13``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``box_ops.py:16-20``."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` x ``(M, 4)`` xyxy boxes -> ``(N, M)`` GIoU, with ``1e-6`` added to the union
    and to the enclosing area as ``box_ops.py:24-58`` (torchvision's adds nothing, so it is not
    used: empty target boxes would give NaN)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    iou = inter / (union + 1e-6)
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / (area + 1e-6)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` masks -> ``(N, 4)`` float32 xyxy boxes ``[x_min, y_min, x_max + 1,
    y_max + 1]`` of their nonzero pixels, zeros for an empty mask (detectron2
    ``BitMasks.get_bounding_boxes``)."""
    masks = masks.bool()
    boxes = torch.zeros(masks.shape[0], 4, dtype=torch.float32, device=masks.device)
    if masks.shape[0] == 0:
        return boxes
    cols, rows = masks.any(1), masks.any(2)  # (N, W), (N, H)
    width, height = masks.shape[2], masks.shape[1]
    xs = torch.arange(width, device=masks.device)
    ys = torch.arange(height, device=masks.device)
    big = max(width, height) + 1
    boxes[:, 0] = torch.where(cols, xs, big).min(1).values
    boxes[:, 1] = torch.where(rows, ys, big).min(1).values
    boxes[:, 2] = torch.where(cols, xs, -1).max(1).values + 1
    boxes[:, 3] = torch.where(rows, ys, -1).max(1).values + 1
    empty = ~(cols.any(1) & rows.any(1))
    boxes[empty] = 0
    return boxes


def target_boxes(masks: torch.Tensor) -> torch.Tensor:
    """A target's boxes: :func:`mask_boxes` as ``(cx, cy, w, h)`` divided by the masks' width
    and height (``model.py:432-446``: the padded input's size in training)."""
    height, width = masks.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=masks.device)
    return box_xyxy_to_cxcywh(mask_boxes(masks)) / scale


@dataclass(frozen=True)
class SimCISWeights:
    """The weights of SimCIS's criterion and matcher (``model.py:146-166``, ``matcher.py:86-91``).
    ``box_weight`` is the mask weight (``"loss_bbox": mask_weight``, ``cost_box = cost_mask``)."""

    set: CriterionWeights = field(default_factory=CriterionWeights)
    box_weight: float = 5.0
    giou_weight: float = GIOU_WEIGHT
    kl_weight: float = 2.0
    focal_alpha: float = FOCAL_ALPHA
    focal_gamma: float = FOCAL_GAMMA


def _match_cost(
    out: dict[str, torch.Tensor], target: dict[str, torch.Tensor], weights: SimCISWeights, gen
) -> torch.Tensor:
    """One image's ``(Q, n)`` cost (``matcher.py:106-175``): focal class cost, L1 and GIoU box
    costs (NaN set to 0), point-sampled mask BCE and dice on one set of uniform points."""
    boxes = target["boxes"]
    cost_bbox = torch.cdist(out["pred_boxes"].float(), boxes, p=1)
    cost_giou = -generalized_box_iou(
        box_cxcywh_to_xyxy(out["pred_boxes"].float()), box_cxcywh_to_xyxy(boxes)
    )
    cost_giou = torch.where(cost_giou.isnan(), 0.0, cost_giou)
    cost_bbox = torch.where(cost_bbox.isnan(), 0.0, cost_bbox)
    prob = out["pred_logits"].float().sigmoid()
    alpha, gamma = weights.focal_alpha, weights.focal_gamma
    neg = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    labels = target["labels"]
    cost_class = pos[:, labels] - neg[:, labels]
    masks = out["pred_masks"][:, None]
    target_masks = target["masks"].to(masks)[:, None]
    coords = torch.rand(1, weights.set.num_points, 2, device=masks.device, generator=gen)
    tgt = point_sample(
        target_masks, coords.repeat(target_masks.shape[0], 1, 1), align_corners=False
    )
    src = point_sample(masks, coords.repeat(masks.shape[0], 1, 1), align_corners=False)
    tgt, src = tgt.squeeze(1), src.squeeze(1)
    with torch.autocast(device_type=masks.device.type, enabled=False):
        src, tgt = src.float(), tgt.float()
        cost_mask = batch_sigmoid_ce_cost(src, tgt)
        cost_dice = batch_dice_cost(src, tgt)
    s = weights.set
    cost = (
        s.mask_weight * cost_mask
        + s.class_weight * cost_class
        + s.dice_weight * cost_dice
        + weights.box_weight * cost_bbox
        + weights.giou_weight * cost_giou
    )
    return cost.reshape(prob.shape[0], -1).cpu()


@torch.no_grad()
def simcis_match(
    out: dict[str, torch.Tensor], targets: Targets, weights: SimCISWeights, generator=None
) -> Indices:
    """SimCIS's Hungarian matching (``matcher.py:95-175``) of ``out`` (``pred_logits``,
    ``pred_masks``, ``pred_boxes`` of one prediction) to ``targets`` (with ``boxes``), one
    ``torch.rand`` of points per image in batch order."""
    return [
        assign(_match_cost({k: v[b] for k, v in out.items()}, t, weights, generator))
        for b, t in enumerate(targets)
    ]


def focal_labels_loss(
    pred_logits: torch.Tensor,
    targets: Targets,
    indices: Indices,
    num_boxes: float,
    virtual_labels: torch.Tensor | None,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
) -> torch.Tensor:
    """``loss_labels`` (``criterion.py:157-215``, ``sigmoid_focal_loss`` ``:24-54``): one-hot
    targets over the ``C`` columns (unmatched queries: none), the last ``V`` queries the virtual
    ones with ``virtual_labels`` ``(B, V)`` (``_modify_indices_targets_for_fake_query``,
    ``:571-600``); ``BCE * (1 - p_t) ** gamma * alpha_t``, its mean over queries summed and
    divided by ``num_boxes``, times ``Q``."""
    logits = pred_logits.float()
    batch, queries, num_classes = logits.shape
    classes = torch.full((batch, queries), num_classes, dtype=torch.int64, device=logits.device)
    matched = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)])
    classes[matched_queries(indices)] = matched.to(logits.device)
    if virtual_labels is not None:
        classes[:, queries - virtual_labels.shape[1] :] = virtual_labels.to(logits.device)
    onehot = F.one_hot(classes, num_classes + 1)[..., :num_classes].to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * onehot + (1 - alpha) * (1 - onehot)) * loss
    return loss.mean(1).sum() / num_boxes * queries


def box_losses(
    pred_boxes: torch.Tensor, targets: Targets, indices: Indices, num_boxes: float
) -> dict[str, torch.Tensor]:
    """``loss_bboxes_panoptic`` (``criterion.py:217-263``, every class a "thing"): L1 and
    ``1 - GIoU`` of the matched boxes, each summed and divided by ``num_boxes``."""
    src = pred_boxes[matched_queries(indices)].float()
    tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)])
    giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
    return {
        "loss_bbox": F.l1_loss(src, tgt, reduction="none").sum() / num_boxes,
        "loss_giou": (1 - giou).sum() / num_boxes,
    }


def kl_distillation(
    student: torch.Tensor, old: torch.Tensor, temperature: float, old_classes: int | None = None
) -> torch.Tensor:
    """``loss_knowledge_distillation`` with ``KD_TYPE kl`` (``criterion.py:297-345``):
    ``KL(softmax(old / T) || softmax(student / T))`` over the class columns (the first
    ``old_classes`` only with ``KL_ALL False``), ``batchmean``: summed over queries and classes,
    divided by the batch size; no ``T**2`` factor (commented out there)."""
    if old_classes is not None:
        student, old = student[..., :old_classes], old[..., :old_classes]
    log_new = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(log_new, F.softmax(old.float() / temperature, dim=-1), reduction="batchmean")


@dataclass(frozen=True)
class Distillation:
    """The old model's side of SimCIS's KL terms: its intermediate and last logits at its
    selected positions, ``KD_TEMPERATURE`` / ``KD_TEMPERATURE2``, whether the last-layer term
    runs (``KD_DECODER``) and ``KL_ALL`` as ``old_classes`` (None: every column)."""

    interm_logits: torch.Tensor
    logits: torch.Tensor
    temperature: float = 1.0
    temperature_decoder: float = 2.0
    decoder: bool = True
    old_classes: int | None = None


def _stage(
    out: dict, targets: Targets, weights: SimCISWeights, norm: float, virtual, gen
) -> dict[str, torch.Tensor]:
    """``labels``, ``masks`` and ``points`` of one prediction, its virtual queries left out of
    the matching and of every loss but the class loss (``criterion.py:480-521, 547-552``)."""
    num_virtual = 0 if virtual is None else virtual.shape[1]
    real = out["pred_logits"].shape[1] - num_virtual
    trimmed = {k: out[k][:, :real] for k in ("pred_logits", "pred_masks", "pred_boxes")}
    indices = simcis_match(trimmed, targets, weights, gen)
    losses = {
        "loss_ce": focal_labels_loss(
            out["pred_logits"],
            targets,
            indices,
            norm,
            virtual,
            weights.focal_alpha,
            weights.focal_gamma,
        )
    }
    losses.update(masks_loss(out["pred_masks"], targets, indices, norm, weights.set, gen))
    losses.update(box_losses(out["pred_boxes"], targets, indices, norm))
    return losses


def simcis_criterion(
    outputs: dict,
    targets: Targets,
    weights: SimCISWeights,
    virtual_labels: torch.Tensor | None = None,
    distill: Distillation | None = None,
    generator: torch.Generator | None = None,
    mean_over_processes: Callable[[torch.Tensor], torch.Tensor] = one_process,
) -> dict[str, torch.Tensor]:
    """SimCIS's unweighted losses (``SetCriterion.forward``, ``criterion.py:455-555``): the last
    prediction's ``loss_ce``, ``loss_mask``, ``loss_dice``, ``loss_bbox``, ``loss_giou`` (and
    ``kl_loss`` with ``distill.decoder``), each earlier layer's with suffix ``_i``, then the
    intermediate prediction's with prefix ``interm_`` (and ``interm_kl_loss``). The normaliser
    is the targets' count, at least 1, averaged over processes.

    Args:
        outputs: the decoder's dict (:class:`incseg.models.mask2former.selection.SelectionDecoder`)
            with ``aux_outputs`` and ``interm``; with ``distill``, its ``distill`` pass too.
        targets: per image ``labels`` and ``masks`` (pseudo targets first), with ``boxes``.
        virtual_labels: ``(B, V)`` classes of the virtual queries (the last ``V`` queries).
    """
    count = sum(len(t["labels"]) for t in targets)
    count = torch.as_tensor([count], dtype=torch.float, device=outputs["pred_logits"].device)
    norm = torch.clamp(mean_over_processes(count), min=1).item()
    losses = _stage(outputs, targets, weights, norm, virtual_labels, generator)
    if distill is not None and distill.decoder:
        losses["kl_loss"] = kl_distillation(
            outputs["distill"]["pred_logits"],
            distill.logits,
            distill.temperature_decoder,
            distill.old_classes,
        )
    for i, aux in enumerate(outputs["aux_outputs"]):
        stage = _stage(aux, targets, weights, norm, virtual_labels, generator)
        losses.update({f"{k}_{i}": v for k, v in stage.items()})
    stage = _stage(outputs["interm"], targets, weights, norm, virtual_labels, generator)
    if distill is not None:
        stage["kl_loss"] = kl_distillation(
            outputs["distill"]["interm_logits"],
            distill.interm_logits,
            distill.temperature,
            distill.old_classes,
        )
    losses.update({f"interm_{k}": v for k, v in stage.items()})
    return losses


def old_predictions(
    logits: torch.Tensor, masks: torch.Tensor, old_count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The old model's kept queries for pseudo-labelling (``model.py:381-400`` with
    ``COMBINE_PSDLABEL True``, ``PSD_LABEL_THRESHOLD 0.0``): per query the highest sigmoid score
    and its class, kept when the score is above 0 and the class is not ``old_count`` (the
    official's ``labels.ne(n_cls)``), sorted by score, masks through a sigmoid.

    Args:
        logits: ``(Q, C)`` class logits; masks: ``(Q, H, W)`` mask logits.
    """
    scores, labels = logits.float().sigmoid().max(-1)
    keep = labels.ne(old_count) & (scores > 0.0)
    order = scores[keep].argsort(descending=True)
    return labels[keep][order], masks[keep][order].float().sigmoid(), scores[keep][order]


def pseudo_targets(
    labels: torch.Tensor,
    probs: torch.Tensor,
    scores: torch.Tensor,
    gt_masks: torch.Tensor,
    overlap: float = OVERLAP_THRESHOLD,
) -> dict[str, torch.Tensor]:
    """``generate_psd_targets`` (``model.py:450-547``, ``strict_mode False``,
    ``COMBINE_PSDLABEL True``): each pixel to the query of highest ``score * probability``; a
    query keeps its pixels there with probability >= 0.5 outside every ground-truth mask, and
    is kept when some are left and more than ``overlap`` of its own area (probability >= 0.5);
    the kept queries' masks are joined per class, classes in increasing order.

    Args:
        labels, probs, scores: :func:`old_predictions`' ``(Q,)``, ``(Q, H, W)``, ``(Q,)``.
        gt_masks: ``(n, H, W)`` the image's ground-truth masks.

    Returns:
        ``{"labels": (m,) int64, "masks": (m, H, W) bool}``.
    """
    if labels.numel() == 0:
        empty = torch.zeros((0, *probs.shape[-2:]), dtype=torch.bool, device=probs.device)
        return {"labels": labels, "masks": empty}
    old_area = (probs >= 0.5).sum(dim=(1, 2))
    owner = (scores.view(-1, 1, 1) * probs).argmax(0)
    mine = owner.unsqueeze(0) == torch.arange(len(labels), device=probs.device).view(-1, 1, 1)
    own = mine & (probs >= 0.5)
    if gt_masks.shape[0]:
        own &= ~gt_masks.bool().any(0)
    new_area = own.sum(dim=(1, 2))
    keep = (new_area > 0) & (new_area > old_area * overlap)
    kept_labels, kept_masks = labels[keep], own[keep]
    classes = kept_labels.unique()
    if len(classes) == 0:
        return {"labels": classes, "masks": kept_masks}
    masks = torch.stack([kept_masks[kept_labels == c].any(0) for c in classes])
    return {"labels": classes, "masks": masks}


def sampling_weights(counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """How often each old class is drawn for a virtual query (``simcis_decoder.py:409-415``):
    ``((sum(n + 1)) / (n + 1)) ** alpha`` of the pseudo-label counts ``n`` of the collection
    pass (``CONT.DISTRIBUTION_ALPHA``)."""
    counts = counts.double() + 1
    return torch.pow(counts.sum() / counts, alpha)


def simcis_inference(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    seen: int,
    overlap: float = OVERLAP_THRESHOLD,
) -> torch.Tensor:
    """``semantic_inference`` (``model.py:551-591``): queries whose highest sigmoid score is at
    least 0.4 (and whose class is not ``seen``, the official's ``labels.ne(n_cls)``) are
    rescored by ``softmax(sigmoid(logits) / 0.06)``; each pixel goes to the query of highest
    score x mask probability, and a query paints its pixels there with probability >= 0.5 unless
    that area and its own area (probability >= 0.5) differ by more than ``overlap`` in either
    direction. Unpainted pixels are ``C`` (void).

    Args:
        pred_logits: ``(B, Q, C)``; pred_masks: ``(B, Q, H, W)`` logits at the output size.

    Returns:
        ``(B, H, W)`` int64 class indices in ``[0, C]``, ``C`` = void.
    """
    out = []
    num_classes = pred_logits.shape[-1]
    for logits, masks in zip(pred_logits.float(), pred_masks.float(), strict=True):
        probs = logits.sigmoid()
        scores, labels = probs.max(-1)
        keep = labels.ne(seen) & (scores >= SCORE_THRESHOLD)
        scores, labels = F.softmax(probs / TEMPERATURE, dim=-1).max(-1)
        out.append(_paint(scores[keep], labels[keep], masks[keep].sigmoid(), num_classes, overlap))
    return torch.stack(out)


def _paint(
    scores: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, void: int, overlap: float
) -> torch.Tensor:
    semseg = torch.full(probs.shape[-2:], void, dtype=torch.long, device=probs.device)
    if probs.shape[0] == 0:
        return semseg
    owner = (scores.view(-1, 1, 1) * probs).argmax(0)
    for k in range(len(labels)):
        area = (owner == k).sum()
        original = (probs[k] >= 0.5).sum()
        mask = (owner == k) & (probs[k] >= 0.5)
        if area > 0 and original > 0 and mask.any():
            if area / original < overlap or original / area < overlap:
                continue
            semseg[mask] = labels[k]
    return semseg


def class_counts(targets: Sequence[dict[str, torch.Tensor]], num_classes: int) -> torch.Tensor:
    """``(num_classes,)`` int64: how many images' pseudo targets hold each class (the collection
    pass's ``psd_num``, ``model.py:303-307``; the targets are joined per class, so each class
    counts once per image)."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for t in targets:
        counts += torch.bincount(t["labels"].cpu(), minlength=num_classes)[:num_classes]
    return counts
