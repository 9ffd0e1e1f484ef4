"""PLOP: Douillard et al., "PLOP: Learning without Forgetting for Continual Semantic Segmentation",
CVPR 2021, as its code publishes it (arthurdouillard/CVPR2021_PLOP at 4b4a060; ``train.py`` lines
cited below; cssegmentation restates the same formulas in ``csseg/modules/runners/plop.py``).

Per step > 0, with the frozen old model:

1. before training, one pass over the step's training images: a histogram per predicted old
   class of the normalised entropy of the old model's prediction on background pixels; each
   class's threshold is the histogram's median, at least ``threshold`` (``train.py:505-589``);
2. every batch, background pixels become pseudo-labels (the old model's class) where the
   normalised entropy is below that class's threshold, and 255 elsewhere; the cross-entropy of
   each image is scaled by its share of background pixels that got a pseudo-label
   (``train.py:252-293``) and averaged over all pixels;
3. Local POD distils width- and height-pooled statistics of the four ResNet stages (before
   their last activation), the ASPP output and the small logits (``train.py:407-437``,
   :func:`incseg.losses.local_pod`).

New classifiers start as MiB's (``--init_balanced``, ``segmentation_module.py:212-235``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, get_args

import torch
from torch import nn

from incseg.losses import local_pod, pixel_mean_cross_entropy
from incseg.methods.base import Method
from incseg.methods.mib import Init, balanced_init
from incseg.protocol.choices import IGNORE_INDEX
from incseg.protocol.steps import StepInfo
from incseg.ranges import LOSS_WEIGHT, Range, ranged

if TYPE_CHECKING:  # annotations only: the model modules import torchvision
    from incseg.models.segmenter import SegmenterOutput

Median = Literal["published", "corrected"]
# The distilled maps, in PLOP's order: 4 stages, the head's output, the logits (``--pod_logits``).
POD_MAPS = ("stage1", "stage2", "stage3", "stage4", "head", "logits_small")


def plop_entropy(probs: torch.Tensor) -> torch.Tensor:
    """PLOP's per-pixel entropy (``entropy``, ``train.py:701-713``):
    ``-(1 / log(O + 1e-8)) * mean_c(p_c * log(p_c + 1e-8))``, a *mean* over the O channels, so at
    most ``1 / O``. ``(B, O, H, W)`` probabilities -> ``(B, H, W)``."""
    factor = 1 / math.log(probs.shape[1] + 1e-8)
    return -factor * torch.mean(probs * torch.log(probs + 1e-8), dim=1)


def max_entropy(num_classes: int) -> torch.Tensor:
    """The normaliser of the entropy, ``log(C_t)`` over *all* classes of the step, new ones
    included (``train.py:514``), as a float32 0-dim CPU tensor: it divides tensors on any device
    without a host-to-device copy."""
    return torch.log(torch.tensor(num_classes, dtype=torch.float32))


def entropy_histogram(
    probs: torch.Tensor, targets: torch.Tensor, num_classes: int, bins: int
) -> torch.Tensor:
    """One batch of PLOP's threshold statistics (``train.py:528-546``): over pixels labelled 0,
    counts per (old model's predicted class, bin of ``plop_entropy / log(C_t)``), the bin being
    ``min(floor(value * bins), bins - 1)``.

    Args:
        probs: ``(B, O, H, W)`` old model's softmax.
        targets: ``(B, H, W)`` training labels (channel indices, 0 = background).
        num_classes: C_t, the step's channels; the histogram has one row per channel.
        bins: number of bins over ``[0, 1]`` (100).

    Returns:
        ``(C_t, bins)`` int64 counts.
    """
    background = targets == 0
    values = plop_entropy(probs)[background] / max_entropy(num_classes)
    classes = probs.max(dim=1).indices[background]
    index = torch.clamp((values * bins).long(), max=bins - 1)
    histogram = torch.zeros(num_classes, bins, dtype=torch.long, device=probs.device)
    histogram.index_put_((classes, index), torch.ones_like(classes), accumulate=True)
    return histogram


def median_thresholds(
    histogram: torch.Tensor, floor: float, rule: str = "published"
) -> torch.Tensor:
    """Per-class thresholds from :func:`entropy_histogram` counts: an interpolated median, at least
    ``floor`` (``train.py:551-587``); a class never predicted gets ``floor``.

    ``rule="published"`` computes what PLOP's code computes (and cssegmentation's copy): walking
    the bins, the running sum grows by each bin's *index* rather than its count
    (``running_sum += lower_border * nb_bins``), and the bin looked at is
    ``int((k / bins) * bins)``, which floating point rounds to ``k - 1`` for some ``k`` (29, 57,
    58 of 100). ``rule="corrected"`` is the histogram median the code describes: the first bin ``k``
    whose cumulative count reaches half the total, ``k / bins + (total / 2 - before) / count_k / bins``.

    Args:
        histogram: ``(C, bins)`` counts.
        floor: PLOP's ``--threshold`` (0.001).
        rule: ``"published"`` or ``"corrected"``.

    Returns:
        ``(C,)`` float32 thresholds, on the histogram's device.
    """
    if rule not in get_args(Median):
        raise ValueError(f"median rule {rule!r}; expected one of {get_args(Median)}")
    counts = histogram.detach().cpu().long()
    bins = counts.shape[1]
    thresholds = torch.zeros(counts.shape[0], dtype=torch.float32)
    for c, row in enumerate(counts):
        total = row.sum()
        if total <= 0:
            continue
        half = total / 2  # a float32 tensor, as in the reference
        if rule == "published":
            running = 0.0
            for k in range(bins):
                border = k / bins
                index = int(border * bins)
                if running <= half <= running + row[index]:
                    break
                running += border * bins
            thresholds[c] = border + ((half - running) / row[index]) * (1 / bins)
        else:
            running = 0
            for k in range(bins):
                if running + int(row[k]) >= half:
                    break
                running += int(row[k])
            thresholds[c] = k / bins + ((half - running) / row[k]) * (1 / bins)
    return torch.clamp(thresholds, min=floor).to(histogram.device)


class PseudoLabels(NamedTuple):
    """What PLOP's :meth:`PLOP.relabel` hands to its :meth:`PLOP.losses`: ``labels`` ``(B, H, W)``
    int64 channel indices (255 = ignore) and ``weights``, the per-image factor of the
    classification loss (``(B, 1, 1)`` float, or 1.0)."""

    labels: torch.Tensor
    weights: torch.Tensor | float


def pseudo_label(
    probs: torch.Tensor,
    targets: torch.Tensor,
    thresholds: torch.Tensor,
    entropy_norm: torch.Tensor,
    num_old: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PLOP's entropy pseudo-labelling of one batch (``train.py:252-293``).

    A pixel is background where its label is below ``num_old`` (old classes are labelled 0 in
    training); it takes the old model's class ``c`` where ``plop_entropy / entropy_norm <
    thresholds[c]``, else 255. Other pixels keep their label.

    Args:
        probs: ``(B, O, H, W)`` old model's softmax; ``O == num_old``.
        targets: ``(B, H, W)`` channel indices, 255 = ignore.
        thresholds: ``(C_t,)`` from :func:`median_thresholds`.
        entropy_norm: :func:`max_entropy` of the step.
        num_old: O.

    Returns:
        ``labels`` ``(B, H, W)`` int64, and ``factor`` ``(B, 1, 1)``: per image, background pixels
        that got a pseudo-label over all background pixels (``+ 1e-6`` in the denominator).
    """
    targets = targets.long()
    pseudo = probs.max(dim=1).indices
    confident = plop_entropy(probs) / entropy_norm < thresholds.to(probs.device)[pseudo]
    background = targets < num_old
    labels = torch.where(background, torch.where(confident, pseudo, IGNORE_INDEX), targets)
    kept = (confident & background).float().sum(dim=(1, 2))
    factor = kept / (background.float().sum(dim=(1, 2)) + 1e-6)
    return labels, factor[:, None, None]


@dataclass
class PLOP(Method):
    """Local POD + entropy pseudo-labelling + MiB's classifier initialisation.

    Attributes (defaults: PLOP's VOC recipe, ``argparser.py:49-57``):
        pod_factor: weight of each backbone stage's and the head's POD term (0.01; 0.001 on ADE20K).
        pod_logits_factor: weight of the logits' POD term (0.0005; 0.00001 on ADE20K).
        pod_schedule: multiply POD by ``sqrt(C_t / N_t)`` (all classes over new ones).
        pseudo: pseudo-label background pixels (False: plain labels, factor 1).
        threshold: the lowest per-class entropy threshold (0.001).
        bins: histogram bins of the threshold pass (100).
        median: ``"published"`` (the code's median, see :func:`median_thresholds`) or ``"corrected"``.
        adaptive_factor: scale each image's cross-entropy by its share of pseudo-labelled
            background (``--classif_adaptive_factor``).
        init: ``"balanced"`` (MiB's, PLOP's ``--init_balanced``) or ``"random"``.
    """

    needs_old_model: ClassVar[bool] = True
    scans_old_model: ClassVar[bool] = True
    features: ClassVar[tuple[str, ...]] = POD_MAPS

    pod_factor: float = ranged(0.01, LOSS_WEIGHT)
    pod_logits_factor: float = ranged(0.0005, LOSS_WEIGHT)
    pod_schedule: bool = True
    pseudo: bool = True
    threshold: float = ranged(
        0.001, Range(0, 1, "normalised entropies lie in [0, 1]; PLOP uses 0.001")
    )
    bins: int = ranged(100, Range(1, 100_000, "histogram bins over [0, 1]; PLOP uses 100"))
    median: Median = "published"
    adaptive_factor: bool = True
    init: Init = "balanced"
    thresholds: torch.Tensor | None = field(default=None, init=False, repr=False)

    def init_new_classifier(self, model: nn.Module, info: StepInfo) -> None:
        if self.init == "balanced":
            balanced_init(model)

    def begin_step(self, info: StepInfo, model: nn.Module) -> None:
        self.thresholds = None  # each step computes its own

    def scan(
        self, old_output: SegmenterOutput, targets: torch.Tensor, info: StepInfo
    ) -> dict[str, torch.Tensor]:
        probs = torch.softmax(old_output.logits.float(), dim=1)
        return {"histogram": entropy_histogram(probs, targets, info.num_channels, self.bins)}

    def end_scan(self, totals: dict[str, torch.Tensor], info: StepInfo) -> None:
        self.thresholds = median_thresholds(totals["histogram"], self.threshold, self.median)

    def relabel(
        self, old_output: SegmenterOutput | None, targets: torch.Tensor, info: StepInfo
    ) -> PseudoLabels:
        if info.step == 0 or not self.pseudo:
            return PseudoLabels(targets.long(), 1.0)
        if self.thresholds is None:
            raise RuntimeError(
                "PLOP: no entropy thresholds; the engine runs scan() before a step > 0"
            )
        probs = torch.softmax(old_output.logits.float(), dim=1)
        self.thresholds = self.thresholds.to(
            probs.device
        )  # once: resumed thresholds load on the CPU
        norm = max_entropy(info.num_channels)
        labels, factor = pseudo_label(probs, targets, self.thresholds, norm, info.num_old_channels)
        return PseudoLabels(labels, factor if self.adaptive_factor else 1.0)

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: PseudoLabels,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        terms = {"ce": pixel_mean_cross_entropy(output.logits, targets.labels, targets.weights)}
        if info.step > 0 and (self.pod_factor > 0 or self.pod_logits_factor > 0):
            factors = [self.pod_factor] * (len(POD_MAPS) - 1) + [self.pod_logits_factor]
            schedule = (
                math.sqrt(info.num_channels / info.channels_per_step[-1])
                if self.pod_schedule
                else 1.0
            )
            old = [old_output.features[name] for name in POD_MAPS]
            new = [output.features[name] for name in POD_MAPS]
            terms["pod"] = local_pod(old, new, factors, schedule)
        return terms

    def step_state_dict(self) -> dict[str, Any]:
        return {} if self.thresholds is None else {"thresholds": self.thresholds.cpu()}

    def load_step_state_dict(self, state: dict[str, Any]) -> None:
        self.thresholds = state.get("thresholds")
