"""ECLIPSE's class loss (clovaai/ECLIPSE 9266720): with ``FOCAL True`` and ``CONT.SOFTCLS False``
its set criterion scores the classes with a sigmoid focal loss
(``continual/method_wrapper/set_criterion.py:69-75``, ``loss.py:11-28``); matching and the mask
losses are Mask2Former's (:mod:`incseg.query_losses`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from incseg.query_losses import Indices, Targets, matched_queries

FOCAL_ALPHA = 5.0  # MODEL.MASK_FORMER.FOCAL_ALPHA (mask2former/config.py:38)
FOCAL_GAMMA = 1.0  # MODEL.MASK_FORMER.FOCAL_GAMMA (:39)


def sigmoid_focal_loss(
    logits: torch.Tensor,
    classes: torch.Tensor,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
) -> torch.Tensor:
    """``loss.py:11-28``: with ``t`` the one-hot of ``classes`` over all ``K + 1`` columns
    (no-object included) and ``p = sigmoid(logits)``, ``50 * mean(alpha * BCE(logits, t) *
    (1 - p_t) ** gamma)``, ``p_t = p t + (1 - p)(1 - t)``, the mean over every query and column.

    Args:
        logits: ``(B, Q, K + 1)`` class logits, no-object last.
        classes: ``(B, Q)`` int64 targets in ``[0, K]``.
    """
    logits = logits.float()
    target = F.one_hot(classes, logits.shape[-1]).to(logits.dtype)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    return (alpha * ce * (1 - p_t) ** gamma).mean() * 50


def sigmoid_focal_labels_loss(
    pred_logits: torch.Tensor,
    targets: Targets,
    indices: Indices,
    num_classes: int,
    eos: float = 0.0,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
) -> torch.Tensor:
    """ECLIPSE's ``loss_ce`` (``set_criterion.py:53-75``): unmatched queries target no-object
    ``K``, then :func:`sigmoid_focal_loss`; the no-object weight ``eos`` is not used there."""
    matched = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)])
    classes = torch.full(
        pred_logits.shape[:2], num_classes, dtype=torch.int64, device=pred_logits.device
    )
    classes[matched_queries(indices)] = matched
    return sigmoid_focal_loss(pred_logits, classes, alpha, gamma)
