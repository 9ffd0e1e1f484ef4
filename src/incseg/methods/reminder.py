"""REMINDER: class-similarity weighted knowledge distillation (Phan et al., "Class Similarity
Weighted Knowledge Distillation for Continual Semantic Segmentation", CVPR 2022), as the official
code computes it (HieuPhan33/REMINDER at f8d225e, a fork of PLOP's code; ``file:line`` below are
in that repository). ``--method REMINDER`` is PLOP with ``csw_kd 0.5`` (``argparser.py:58-67``):
this class is :class:`~incseg.methods.plop.PLOP` (pseudo-labels, adaptive factor, Local POD, MiB's
init) plus the CSW-KD term and the class prototypes it needs.

- **Prototypes** (``train.py:20-31, 628-647``, ``run.py:542-548``): after each step (step 0
  included), one pass of the step's final model in eval mode over the step's training batches
  (their augmentation, ground-truth labels): the head features (ASPP output) upsampled
  bilinearly with ``align_corners=True`` to the labels' size; per batch, the mean feature of each
  class of the step (at step 0 the background too); per class, an equal-weight running mean of
  those batch means over the batches where the class appears. Old classes keep the prototypes of
  the step that learned them.
- **CSW-KD** at steps t > 0 (``utils/loss.py:326-364``, ``train.py:428-439``): on pixels whose
  label (after pseudo-labelling) is a new class, with ``bp`` the batch prototypes of the new
  classes from the *student's* head features (same upsampling; no gradient through them) and
  ``P`` the O stored prototypes: ``w = softmax_c(cos(bp[y_p], P_c))`` over the old channels, set
  to 0 below ``delta / O`` (no renormalisation); target ``q = softmax(z_old / T) * w + 1e-7``;
  ``L = weight * T^2 * sum_p sum_c -q_pc log_softmax(z_new[:O] / T)_c / |pixels|`` with T = 3,
  on the full-resolution logits.

Options where the official history disagrees (``prototypes``): ``corrected`` flattens features
and labels in the same order (``permute(0, 2, 3, 1)``, the code since f8d225e); ``published``
flattens the features with ``transpose(1, 3)`` against row-major labels, so each label meets the
feature at the transposed position (7872ac7, the code behind the paper's numbers; square crops
only). Quirks kept: the cosine has no epsilon (a zero prototype gives NaN, set to 0,
``loss.py:265-278``). Not reproduced: a batch without a new-class pixel makes the official term
0/0 (NaN in its log, zero gradient); incseg gives 0. The official batch prototypes are each GPU's
own (and its stored prototypes one process's: every rank writes the same file); incseg's are the
global batch's, so any number of processes trains as one process with the global batch (its VOC
15-1 script runs one GPU, where both agree). See docs/methods.md, ``reminder``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from incseg.errors import IncsegError
from incseg.methods.base import StepData
from incseg.methods.plop import PLOP, POD_MAPS, PseudoLabels
from incseg.methods.processes import reduce_over_processes, world
from incseg.protocol.choices import IGNORE_INDEX
from incseg.protocol.steps import StepInfo
from incseg.ranges import LOSS_WEIGHT, Range, ranged

if TYPE_CHECKING:
    from incseg.models.segmenter import SegmenterOutput

Layout = Literal["corrected", "published"]


def _interpolation_matrix(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """``(size_in, size_out)``: the weights of 1-D linear interpolation with
    ``align_corners=True``, taken from PyTorch's own ``interpolate`` of a basis."""
    basis = torch.eye(size_in, device=device).view(size_in, 1, size_in, 1)
    out = F.interpolate(basis, size=(size_out, 1), mode="bilinear", align_corners=True)
    return out[:, 0, :, 0]


def _pixels_per_process(labels: torch.Tensor, num_old: int) -> torch.Tensor | None:
    """The global batch's new-class pixels over the number of processes (None for one process):
    dividing each process's sum by it, then averaging the gradients as DDP does, gives the
    global batch's mean, as one process would."""
    if world()[1] == 1:
        return None
    count = ((labels >= num_old) & (labels != IGNORE_INDEX)).sum().float()
    return reduce_over_processes(count) / world()[1]


def batch_prototypes(
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: range,
    layout: Layout = "corrected",
    *,
    across_processes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean feature of one batch (``compute_prototype``, ``train.py:20-31``): the mean,
    over the class's pixels, of the features upsampled to the labels' size (bilinear,
    ``align_corners=True``).

    Computed without the upsampled map (at 512 px it would be B x 256 x 512 x 512): bilinear
    upsampling is separable and linear, ``up(f) = R_h f R_w^T``, so the sum over a class mask
    ``m`` is ``sum_ij f_ij (R_h^T m R_w)_ij`` (the same value up to float rounding;
    tests/test_reminder.py checks it against the literal upsampling). ``published`` pairs each
    label with the feature at the transposed position (square crops).

    Args:
        features: ``(B, D, h, w)`` head features.
        labels: ``(B, H, W)`` channel indices, 255 = ignore.
        classes: the channels to compute.
        across_processes: the means over the batches of all processes (each process must call
            this with the same classes; the official code keeps each GPU's own).

    Returns:
        ``(max(classes) + 1, D)`` float32 means (zero rows for absent or other classes) and a
        ``(max(classes) + 1,)`` bool tensor of the classes present.
    """
    features, labels = features.float(), labels.long()
    (h, w), (height, width) = features.shape[-2:], labels.shape[-2:]
    if layout == "published":
        if height != width:
            raise ValueError(
                f"the published prototype layout needs square crops, got {height}x{width}"
            )
        labels = labels.transpose(1, 2)
    rows = _interpolation_matrix(h, height, features.device)  # (h, H)
    cols = _interpolation_matrix(w, width, features.device)  # (w, W)
    sums = features.new_zeros(max(classes) + 1, features.shape[1])
    counts = features.new_zeros(max(classes) + 1)
    for c in classes:
        mask = (labels == c).float()
        counts[c] = mask.sum()
        if bool(counts[c] > 0):
            weights = rows @ mask @ cols.T  # (B, h, w): each feature cell's share of the class
            sums[c] = torch.einsum("bdij,bij->d", features, weights)
    if across_processes:  # the global batch's sums (one process with the global batch)
        sums, counts = reduce_over_processes(sums), reduce_over_processes(counts)
    present = counts > 0
    means = torch.zeros_like(sums)
    means[present] = sums[present] / counts[present, None]
    return means, present


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(N, D) x (M, D) -> (N, M)`` cosines without an epsilon; NaN (a zero row) becomes 0
    (``pairwise_cosine_sim``, ``utils/loss.py:265-278``)."""
    sim = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    return torch.nan_to_num(sim, nan=0.0)


def csw_distillation(
    logits: torch.Tensor,
    old_logits: torch.Tensor,
    labels: torch.Tensor,
    prototypes_now: torch.Tensor,
    prototypes_old: torch.Tensor,
    *,
    delta: float = 0.0,
    temperature: float = 3.0,
    pixels: torch.Tensor | None = None,
) -> torch.Tensor:
    """CSW-KD before its weight (``ClassSimilarityWeightedKD``, ``utils/loss.py:326-364``).

    Args:
        logits: ``(B, C_t, H, W)`` student logits; only the O old channels are used.
        old_logits: ``(B, O, H, W)``.
        labels: ``(B, H, W)`` labels after pseudo-labelling; pixels with ``O <= y < 255`` count.
        prototypes_now: ``(C_t, D)`` batch prototypes (rows of new classes used).
        prototypes_old: ``(O, D)`` stored prototypes.
        pixels: what the sum is divided by (default: this batch's new-class pixels).

    Returns:
        ``T^2 sum(-q log p) / |pixels|``, 0 without a new-class pixel.
    """
    num_old = old_logits.shape[1]
    labels = labels.reshape(-1).long()
    mask = (labels >= num_old) & (labels != IGNORE_INDEX)
    if not bool(mask.any()):
        return logits.sum() * 0.0
    student = logits[:, :num_old].float().permute(0, 2, 3, 1).reshape(-1, num_old)[mask]
    teacher = old_logits.float().permute(0, 2, 3, 1).reshape(-1, num_old)[mask]
    with torch.no_grad():
        weights = cosine_similarity(prototypes_now[labels[mask]], prototypes_old).softmax(dim=-1)
        weights = torch.where(weights < delta / num_old, torch.zeros_like(weights), weights)
        target = (teacher / temperature).softmax(dim=1) * weights + 1e-7
    log_p = (student / temperature).log_softmax(dim=1)
    return temperature**2 * (-target * log_p).sum() / (mask.sum() if pixels is None else pixels)


@dataclass
class REMINDER(PLOP):
    """PLOP + class-similarity weighted distillation on new-class pixels (module docstring).

    Attributes (besides PLOP's):
        csw_weight: weight of CSW-KD (``--csw_kd``: 0.5, ``argparser.py:67``).
        delta: similarity threshold times O (``--delta_csw``: 0 on VOC, 1.0 in the ADE20K scripts).
        temperature: T of CSW-KD (3, fixed in ``utils/loss.py:327``).
        prototypes: ``corrected`` or ``published`` flattening (module docstring).
    """

    plain_first_step: ClassVar[bool] = False  # step 0 leaves its prototypes
    features: ClassVar[tuple[str, ...]] = POD_MAPS

    csw_weight: float = ranged(0.5, LOSS_WEIGHT)
    delta: float = ranged(
        0.0, Range(0, 1e3, "keeps old classes whose similarity weight is >= delta / O; 0 keeps all")
    )
    temperature: float = ranged(3.0, Range(0, 100, "CSW-KD temperature (3)", low_open=True))
    prototypes: Layout = "corrected"
    _prototypes: torch.Tensor | None = field(default=None, init=False, repr=False)

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: PseudoLabels,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        terms = super().losses(output, old_output, targets, info)
        if info.step == 0 or self.csw_weight == 0:
            return terms
        if self._prototypes is None or self._prototypes.shape[0] < info.num_old_channels:
            raise IncsegError(
                f"reminder: step {info.step} needs the class prototypes of steps 0..{info.step - 1}, "
                "which REMINDER computes at the end of each step and saves in its checkpoint; the "
                "previous step was not trained by REMINDER (--start-from another method's run?)"
            )
        with torch.no_grad():
            new = range(info.num_old_channels, info.num_channels)
            now, _ = batch_prototypes(
                output.features["head"], targets.labels, new, self.prototypes, across_processes=True
            )
        old = self._prototypes[: info.num_old_channels].to(now.device)
        kd = csw_distillation(
            output.logits,
            old_output.logits,
            targets.labels,
            now,
            old,
            delta=self.delta,
            temperature=self.temperature,
            pixels=_pixels_per_process(targets.labels, info.num_old_channels),
        )
        return terms | {"csw": self.csw_weight * kd}

    @torch.no_grad()
    def after_training(self, data: StepData, info: StepInfo, model: nn.Module) -> None:
        first = 0 if info.step == 0 else info.num_old_channels
        classes = range(first, info.num_channels)
        total = torch.zeros(info.num_channels, model.classifiers[0].in_channels, device=data.device)
        count = torch.zeros(info.num_channels, device=data.device)
        model.eval()
        for images, targets in data.batches(data.epochs - 1):
            with data.autocast():
                head = model(images, features=("head",)).features["head"]
            means, present = batch_prototypes(
                head, targets, classes, self.prototypes, across_processes=True
            )
            # train.py:640-645: an equal-weight running mean of the batch means, a class counted
            # once per batch where it appears (the sum of the means over the count).
            count += present
            total[present] += means[present]
        found = count > 0
        prototypes = torch.zeros_like(total)
        prototypes[found] = total[found] / count[found, None]
        if info.step > 0 and self._prototypes is not None:
            prototypes[: info.num_old_channels] = self._prototypes[: info.num_old_channels].to(
                prototypes.device
            )
        self._prototypes = prototypes.float().cpu()

    def state_dict(self) -> dict[str, Any]:
        return {} if self._prototypes is None else {"prototypes": self._prototypes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._prototypes = state.get("prototypes")
