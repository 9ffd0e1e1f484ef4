"""UCD: uncertainty-aware contrastive distillation (Yang et al., "Uncertainty-aware Contrastive
Distillation for Incremental Semantic Segmentation", TPAMI 2022), an add-on to any method
(``method.name: mib+ucd``, the paper's MiB+UCD; ``plop+ucd``), as the official loss code defines
it (ygjwd12345/UCD at cc73546; ``utils/utils.py:256-393`` builds the pairs, ``utils/loss.py:403-466``
is the loss, ``train.py:113-116`` adds it with weight 1/100 at steps > 0).

At a step t > 0, on each batch, with ``f`` the student's and ``g`` the old model's head features
(the ASPP output, ``(B, D, h, w)``) and ``z`` the old model's logits at that resolution:

1. Labels at feature resolution: the step's training labels (channel indices; under UCD's own
   convention void stays 255, see below) resized *bilinearly* (``align_corners=False``),
   truncated to integers; values outside ``[0, last class]`` become 0 (``utils.py:264-268``,
   where the last class is VOC's 20; incseg uses the setting's last channel). The official code
   truncates by a cast to int8 (``:264``): a resized value in 21..255 wraps to a negative number
   or saturates at 127, and either is set to 0 by ``:267-268``, so truncation and the range test
   give the same labels. Hence a void pixel (255) becomes 0 and takes the old model's label in
   step 2, like background; a mixture of void and a class becomes 0 unless it truncates into
   ``[0, last]`` (5% of 255 beside background: 12.75 -> class 12, as in the official code).
2. Mixed labels: where the label is 0, the old model's argmax of ``z`` (``:352-357``). Anchors are
   the student's L2-normalised features at pixels with a mixed label > 0; the contrast set is the
   anchors (detached) followed by the old model's normalised features at pixels whose label came
   from the old model (``:358-364``).
3. Weights ("joint probability", ``:366-391``): ``P[i, j] = softmax(z_i) . softmax(z_j)``; 1 where
   both labels are >= the smallest ground-truth class of the batch (new with new).
4. Loss (``loss.py:431-466``), temperature tau 0.07: ``s = a c^T / tau``; negatives
   ``N_i = sum_{k: y_k != y_i} exp(s_ik)`` on the *unshifted* ``s``; ``s' = s - max_j s_ij``;
   ``L_i = -(1 / |P_i|) sum_{j in P_i} P_ij (s'_ij - log(exp(s'_ij) + N_i))`` over positives
   ``P_i`` (same label, the pixel itself excluded; ``|P_i|`` unweighted); mean over anchors with
   a positive. The official shift on one side only is kept: it changes the value.

Training labels and cross-entropy: the official data code masks as PLOP's does
(``dataset/voc.py:182-207``, ``data_masking="current"``): void stays 255 and every class outside
the step is 0 in training and validation labels, and at test unseen classes are 0; the
cross-entropy is taken per pixel and averaged over *all* pixels, void ones counting 0
(``train.py:30, 37-40, 112, 116``). incseg's ``voc/*-mib+ucd`` configs therefore set
``protocol.labels: plop`` and MiB's ``ce_reduction: all``; cssegmentation's UCD (the
``seed/mib+ucd_*`` configs) uses the same labels but averages over non-void pixels.

The official ``train.py`` cannot run as committed (``:115`` unpacks three values from
``pre_contractive_pixel``, which returns five with its ``version = 'v2'``); incseg follows the
five-value path the loss code defines. Not reproduced: the official model freezes the step-0
classifier at every step (``segmentation_module.py:75-78``), a leftover the paper does not
describe; a batch without any ground-truth pixel at feature resolution (official: an error from
``.min()`` of an empty tensor) or without any positive pair (official: NaN) gives 0 here. Under
several processes the pairs are those of the global batch (the official code pairs each GPU's
pixels only), so any number of processes trains as one process with the global batch.
cssegmentation's UCD (``csseg/modules/runners/ucd.py:152-160``) builds its new-class masks from
zeros, so the weight-1 override of step 3 never applies, and keeps resized labels up to the
number of seen channels rather than 20 (``:67, 129``); incseg follows the official code for both
(docs/methods.md, ``ucd``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from incseg.methods.base import AddOn
from incseg.methods.processes import gather_rows, reduce_over_processes, world
from incseg.protocol.steps import StepInfo
from incseg.ranges import LOSS_WEIGHT, Range, ranged

if TYPE_CHECKING:
    from incseg.models.segmenter import SegmenterOutput


def labels_at(targets: torch.Tensor, size: tuple[int, int], last: int) -> torch.Tensor:
    """``(B, H, W)`` channel indices (255 = void) -> ``(B, h, w)`` long: bilinear resize
    (``align_corners=False``), truncation, values outside ``[0, last]`` set to 0
    (``utils.py:264-268``; equal to the official int8 cast for values in 0..255, module
    docstring, step 1): void becomes 0, a small share of void beside a class can give a class
    id in ``[0, last]``."""
    resized = F.interpolate(targets[:, None].float(), size, mode="bilinear", align_corners=False)
    labels = resized[:, 0].trunc().long()
    return torch.where((labels >= 0) & (labels <= last), labels, torch.zeros_like(labels))


def contrastive_pairs(
    features: torch.Tensor,
    old_features: torch.Tensor,
    old_logits: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, ...] | None:
    """Anchors, contrast set, their labels and the weights (``utils.py:349-393``, ``v2``).

    Under several processes the contrast set, and the smallest ground-truth label, are those
    of the global batch (the official code pairs the pixels of each GPU's batch only), so that
    any number of processes computes what one process with the global batch computes.

    Args:
        features, old_features: ``(B, D, h, w)`` student / old head features.
        old_logits: ``(B, O, h, w)`` old logits at feature resolution.
        labels: ``(B, h, w)`` from :func:`labels_at`.

    Returns:
        ``(anchors (A, D), contrast (A' + K', D), anchor labels (A,), contrast labels
        (A' + K',), weights (A, A' + K'), offset)``: the contrast set starts with every
        process's anchors (A' of them; this process's from row ``offset``), then the pixels
        labelled by the old model; None when the global batch has no ground-truth pixel.
    """
    dim = features.shape[1]
    labels = labels.reshape(-1)
    truth = labels > 0
    none = torch.iinfo(torch.long).max
    smallest = (
        labels[truth].min() if bool(truth.any()) else torch.tensor(none, device=labels.device)
    )
    reduce_over_processes(smallest, "min")
    if int(smallest) == none:
        return None
    pseudo = old_logits.argmax(dim=1).reshape(-1)
    mixed = torch.where(labels == 0, pseudo, labels)
    anchor, extra = mixed > 0, (mixed > 0) & ~truth
    flat = features.permute(0, 2, 3, 1).reshape(-1, dim)
    old_flat = old_features.permute(0, 2, 3, 1).reshape(-1, dim)
    anchors = F.normalize(flat[anchor].float(), dim=1)
    probs = old_logits.permute(0, 2, 3, 1).reshape(-1, old_logits.shape[1]).float().softmax(-1)
    anchor_labels = mixed[anchor]
    own = [anchors, anchor_labels, probs[anchor]]
    others = [F.normalize(old_flat[extra].float(), dim=1), mixed[extra], probs[extra]]
    gathered = [gather_rows(t) for t in (*own, *others)]
    rank = world()[0]
    offset = sum(part.shape[0] for part in gathered[0][:rank])
    contrast, contrast_labels, contrast_probs = (
        torch.cat([*gathered[i], *gathered[i + 3]]) for i in range(3)
    )
    weights = probs[anchor] @ contrast_probs.T
    both_new = (anchor_labels >= smallest)[:, None] & (contrast_labels >= smallest)[None]
    weights = torch.where(both_new, torch.ones_like(weights), weights)
    return anchors, contrast, anchor_labels, contrast_labels, weights, offset


def pixel_contrastive_loss(
    anchors: torch.Tensor,
    contrast: torch.Tensor,
    anchor_labels: torch.Tensor,
    contrast_labels: torch.Tensor,
    weights: torch.Tensor,
    offset: int = 0,
    temperature: float = 0.07,
) -> torch.Tensor:
    """``PixelConLossV2`` (``loss.py:431-466``; module docstring, step 4). Arguments as returned
    by :func:`contrastive_pairs`: rows ``offset .. offset + A`` of ``contrast`` are the anchors
    themselves (their self-pairs are not positives). The mean over anchors with a positive is
    taken over every process's anchors (DDP then averages the processes' gradients)."""
    num = anchors.shape[0]
    same = (anchor_labels[:, None] == contrast_labels[None]).float()
    positive = same.clone()
    positive[:, offset : offset + num] -= torch.eye(num, device=anchors.device)
    negative = 1 - same
    scores = anchors @ contrast.T / temperature
    negatives = (scores.exp() * negative).sum(dim=1, keepdim=True)
    scores = scores - scores.max(dim=1, keepdim=True).values.detach()
    terms = (scores - torch.log(scores.exp() + negatives)) * positive * weights
    count = positive.sum(dim=1)
    keep = count != 0
    # Every process's anchors with a positive, per process: DDP averages the gradients.
    kept = reduce_over_processes(keep.sum().float()) / world()[1]
    if float(kept) == 0:
        return anchors.sum() * 0.0
    return -(terms.sum(dim=1)[keep] / count[keep]).sum() / kept


@dataclass
class UCD(AddOn):
    """Uncertainty-aware contrastive distillation at steps > 0 (module docstring).

    Attributes:
        weight: the term's weight (1/100, hard-coded at ``train.py:116``; cssegmentation's
            ``contrastive.scale_factor`` 0.01).
        temperature: tau (``--temperature`` 0.07, ``argparser.py:138-139``).
    """

    needs_old_model: ClassVar[bool] = True
    features: ClassVar[tuple[str, ...]] = ("head", "logits_small")

    weight: float = ranged(0.01, LOSS_WEIGHT)
    temperature: float = ranged(
        0.07, Range(0, 100, "softmax temperature of the similarities (0.07)", low_open=True)
    )

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        if info.step == 0 or self.weight == 0:
            return {}
        assert old_output is not None, "UCD needs the old model's outputs at steps > 0"
        head, old_head = output.features["head"], old_output.features["head"]
        last = info.num_channels + len(info.future_classes) - 1
        labels = labels_at(targets, tuple(head.shape[-2:]), last)
        pairs = contrastive_pairs(head, old_head, old_output.features["logits_small"], labels)
        if pairs is None:
            return {"ucd": head.sum() * 0.0}
        return {"ucd": self.weight * pixel_contrastive_loss(*pairs, temperature=self.temperature)}
