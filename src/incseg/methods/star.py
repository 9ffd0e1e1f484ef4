"""STAR and STAR-M (Chen et al., "Saving 100x Storage: Prototype Replay for Reconstructing Training
Sample Distribution in Class-Incremental Semantic Segmentation", NeurIPS 2023), as the official
code computes them (jinpeng0528/STAR at 9e31f36, built on DKD's code; ``file:line`` below are in
it, ``T:`` is ``trainer/trainer_voc.py``, ``B:`` ``base/base_trainer.py``). docs/methods.md,
``star``.

Model: ``model.architecture: star`` (:class:`incseg.models.heads.ObjectSegmenter`): one sigmoid per
class, no background and no auxiliary channel; a new classifier starts from its random init.

Stored per class after the step that learnt it (B:169-278), from the final model in eval mode
over the step's training batches, at the head's feature resolution (labels sampled at the centre
of each cell, ``[:, 8::16, 8::16]`` for a 512 crop at stride 16): the *prototype* (the
normalised sum of the unit features), the mean and (unbiased) standard deviation of the feature
norms, the per-channel RMS deviation of the unit features from the prototype (*noise*), and the
pixel count. Quirk kept (``noise: official``): from step 1 on, the noise of a new class is
measured around the prototype of the *old* class with its index (B:235, 259: the new rows are
indexed from 0 into ``cat(old, new)``); ``own`` uses its own prototype.

Steps > 0 (T:300-470):

- a pass of the old model over the step's batches counts, per grid cell of background-labelled
  pixels, what the old model predicts (``compute_pred_number``, T:502-527; "prediction" is the
  argmax, background unless a *raw logit* exceeds 0.5, T:398-401, 513-516); from it, once per
  step (T:362-388), the replay count per old class and iteration, ``int((stored - predicted) /
  batches)`` (overlap; disjoint ``int(stored / batches)``), at least 0, and the extra background
  ratio;
- every iteration, per old class ``c``: ``n_c`` replayed features ``(p_c + noise_c * e1) *
  (mean_c + std_c * e2)``, ``e1``, ``e2`` standard normal per element (T:406-420), and the
  feature cells that are background for both the labels and the old model;
- ``mbce``: per new class, ``(BCE(real, pos_weight) + w_fake BCE(replayed, 0) + w_bg
  BCE(background cells, 0)) / (1 + w_fake + w_bg)``, ``w_fake`` = replayed count / cells of the
  batch, ``w_bg`` = extra ratio x background cells / cells (T:431-455), summed over new classes;
  void pixels are negatives (``models/loss.py:68-84``);
- ``pkd`` (OCFM): mean squared difference of the head features where the old model predicts an
  object on background-labelled pixels (mask resized bilinearly), ``loss.py:94-107``;
- ``cont`` (SAD): the mean over new classes of ``1 / distance`` from the batch's new-class centre
  to the nearest stored old prototype, ``loss.py:110-135``.

Weights (``configs/config_voc.json:75-80``): pos_weight 4 (ADE20K 30), mbce 1, pkd 5, cont 0.05.
Step 0 trains the BCE alone. Steps > 0 freeze every BN and the dropout (eval mode, BN affine not
trained); LR groups backbone x1, head x10, old classifiers x10, new classifier x100
(``train_voc.py:123-142``). Memory (STAR-M): as DKD-M (joined, current labels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from incseg.methods.base import Method, StepData
from incseg.methods.dkd import POS_WEIGHT, class_bce, new_class_targets, step_groups
from incseg.methods.processes import world
from incseg.methods.ssul import MEMORY_SIZE
from incseg.protocol.steps import StepInfo
from incseg.ranges import LOSS_WEIGHT, Range, ranged

if TYPE_CHECKING:
    from incseg.models.segmenter import SegmenterOutput

log = logging.getLogger(__name__)
MEMORY_THRESHOLD = 0.9  # utils/memory.py:101-105


def old_prediction(old_logits: torch.Tensor) -> torch.Tensor:
    """STAR's old-model prediction (T:398-401): ``(B, K, H, W)`` logits of the K object classes
    -> ``(B, H, W)`` channel (1..K), 0 where no *logit* (not sigmoid) exceeds 0.5."""
    pred = old_logits.argmax(1) + 1
    return pred.masked_fill(~(old_logits > 0.5).any(1), 0)


def grid_sample_labels(labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Labels at the centre of each feature cell: ``[:, s // 2 :: s]`` per axis with stride
    ``s = H // h`` (``[:, 8::16, 8::16]`` at 512 / 32, B:190-191)."""
    sh, sw = labels.shape[-2] // grid[0], labels.shape[-1] // grid[1]
    return labels[..., sh // 2 :: sh, sw // 2 :: sw][..., : grid[0], : grid[1]]


def replayed_features(
    prototypes: torch.Tensor,
    norms: torch.Tensor,
    noise: torch.Tensor,
    counts: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """The replayed features of one iteration (T:406-420): ``(N, D)`` rows, ``counts[c]`` of old
    class ``c``: ``(p_c + noise_c * e1) * (norms[0, c] + norms[1, c] * e2)`` with ``e1``, ``e2``
    standard normal per element, drawn from ``generator``.

    Args:
        prototypes: ``(K, D)``; norms: ``(2, K)`` mean and std; noise: ``(K, D)``;
        counts: ``(K,)`` int; all on the CPU, where the generator draws (the caller moves the
        result to the device once).
    """
    rows = []
    for c, n in enumerate(counts.tolist()):
        # Drawn channel-major, as randn_like of the official (1, D, n, 1) tensor.
        e1 = torch.randn((prototypes.shape[1], n), generator=generator).t()
        e2 = torch.randn((prototypes.shape[1], n), generator=generator).t()
        jittered = prototypes[c] + e1 * noise[c]
        rows.append(jittered * (e2 * norms[1, c] + norms[0, c]))
    if not rows:
        return prototypes.new_zeros(0, prototypes.shape[1])
    return torch.cat(rows)


def ocfm_loss(
    features: torch.Tensor, old_features: torch.Tensor, region: torch.Tensor
) -> torch.Tensor:
    """OCFM (``PKDLoss``, ``loss.py:94-107``): ``sum (x - x_old)^2 m / (sum m * D)`` with ``m``
    the full-resolution ``(B, H, W)`` bool ``region`` resized bilinearly to the features'
    ``(B, D, h, w)`` grid. 0 when ``m`` is 0 everywhere (the official 0/0 is NaN)."""
    mask = F.interpolate(
        region.unsqueeze(1).float(), features.shape[-2:], mode="bilinear", align_corners=False
    )
    diff = (features.float() - old_features.float()).pow(2) * mask
    # Where m is 0 everywhere the sum is 0 too: the clamp gives 0 without a read-back.
    return diff.sum() / (mask.sum().clamp(min=1e-12) * features.shape[1])


def sad_loss(
    features: torch.Tensor, onehot: torch.Tensor, old_prototypes: torch.Tensor
) -> torch.Tensor:
    """SAD (``ContLoss``, ``loss.py:110-135``): per new class the normalised sum of the unit
    features weighted by its full-resolution one-hot ``(B, N, H, W)`` resized bilinearly to the
    features' grid; the mean over new classes of ``1 / distance`` to the nearest ``(K, D)`` old
    prototype. A class absent from the batch has a zero centre, at distance 1."""
    weights = F.interpolate(onehot, features.shape[-2:], mode="bilinear", align_corners=False)
    unit = F.normalize(features.float(), p=2, dim=1)
    centres = F.normalize(torch.einsum("bdhw,bnhw->nd", unit, weights), p=2, dim=1)
    dist = torch.cdist(centres, old_prototypes.float())  # (N, K)
    return (1.0 / dist.min(1).values).mean()


@dataclass
class STAR(Method):
    """STAR / STAR-M (module docstring).

    Attributes:
        memory_size: exemplar images in total (0: STAR; 50 on VOC: STAR-M).
        pos_weight: positive weight of the new classes' BCE (4 VOC, 30 ADE20K).
        mbce, pkd, cont: the terms' weights (1, 5, 0.05).
        noise: ``official`` (around the old prototype of the same index from step 1 on) or
            ``own``.
        classifier_lr_scale, new_classifier_lr_scale: LR factors of the head and old classifiers
            (10) and of the new classifier (100).
    """

    architecture: ClassVar[str] = "star"
    needs_old_model: ClassVar[bool] = True
    # The -M variant's memory on VOC (``incseg compare --methods NAME-m``).
    memory_variant: ClassVar[int] = 50
    scans_old_model: ClassVar[bool] = True
    features: ClassVar[tuple[str, ...]] = ("head",)

    memory_size: int = ranged(0, MEMORY_SIZE)
    pos_weight: float = ranged(4.0, POS_WEIGHT)
    mbce: float = ranged(1.0, LOSS_WEIGHT)
    pkd: float = ranged(5.0, LOSS_WEIGHT)
    cont: float = ranged(0.05, LOSS_WEIGHT)
    noise: Literal["official", "own"] = "official"
    classifier_lr_scale: float = ranged(10.0, Range(0, 1000, "LR factor"))
    new_classifier_lr_scale: float = ranged(100.0, Range(0, 100000, "LR factor"))
    # The replay schedule's rule (T:327-330, 364-385); the config sets it to protocol.mode.
    mode: Literal["overlap", "disjoint"] = "overlap"

    def __post_init__(self) -> None:
        # Across steps: per object class seen (row c - 1 for channel c) and the pixel counts.
        self.stats: dict[str, torch.Tensor] = {}
        # Within a step: the replay schedule and its random stream.
        self.schedule: dict[str, Any] = {}
        self._new: nn.Module | None = None
        self._generator = torch.Generator()

    # -- the step's start ------------------------------------------------------------------
    def begin_step(self, info: StepInfo, model: nn.Module) -> None:
        model.frozen_norm = model.frozen_dropout = info.step > 0
        self._new = model.classifiers[-1]
        self.schedule = {}
        # A stream of its own per step and process; the engine seeded the global RNG for the step.
        self._generator.manual_seed(torch.initial_seed() * 7919 + world()[0])

    def param_groups(self, model: nn.Module, info: StepInfo) -> list[dict]:
        return step_groups(
            model, info.step, self.classifier_lr_scale, self.new_classifier_lr_scale, None
        )

    # -- the pass before training (steps > 0) ---------------------------------------------
    def scan(
        self, old_output: SegmenterOutput, targets: torch.Tensor, info: StepInfo
    ) -> dict[str, torch.Tensor]:
        """Per batch (T:502-527, B:139-167), on the feature grid: background cells the old model
        calls background (0) or class ``c`` (``c``), and the cells of background and of each new
        class in the labels."""
        old = info.num_old_channels
        grid = old_output.features["head"].shape[-2:]
        labels = grid_sample_labels(targets.long(), grid)
        pred = grid_sample_labels(old_prediction(old_output.logits), grid)
        background = labels == 0
        predicted = torch.bincount(pred[background].flatten(), minlength=old)[:old]
        current = torch.bincount(
            labels[labels < info.num_channels].flatten(), minlength=info.num_channels
        )
        return {"predicted": predicted.double(), "labelled": current.double()}

    def end_scan(self, totals: dict[str, torch.Tensor], info: StepInfo) -> None:
        self.schedule["predicted"] = totals["predicted"]
        counts = totals["labelled"]
        self.schedule["new_counts"] = torch.cat([counts[:1], counts[info.num_old_channels :]])

    def prepare_step(
        self, data: StepData, info: StepInfo, model: nn.Module, old_model: nn.Module
    ) -> None:
        """The replay schedule (T:362-388), once per step: it needs the batches per epoch."""
        stored, predicted = self.stats["numbers"].to(data.device), self.schedule["predicted"]
        predicted = predicted.to(data.device)
        overlap = self.mode == "overlap"
        batches = data.batches_per_epoch
        excess = stored[1:] - predicted[1:] if overlap else stored[1:]
        per_iteration = torch.clamp((excess / batches).to(torch.int), min=0)
        new = info.num_channels - info.num_old_channels
        bg = stored[0] * (1 - 0.01 * new) if overlap else stored[0]
        extra = torch.clamp(bg / predicted[0] - (0.5 if overlap else 0.0), min=0)
        if not bool(predicted[0] > 0):  # the official divides by zero (an infinite weight)
            extra = torch.zeros(())
        total = stored.clone()
        if overlap:
            total[0] = predicted[0] * 0.5 + bg
        else:
            total[0] = predicted[0] + bg
            total[1:] = stored[1:] + predicted[1:]
        new_counts = self.schedule["new_counts"].to(data.device)
        self.schedule.update(
            per_iteration=per_iteration.cpu(),
            extra_bg_ratio=float(extra),
            numbers=torch.cat([total, new_counts[1:]]).cpu(),
        )

    # -- every iteration ------------------------------------------------------------------
    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        first = info.num_old_channels if info.step > 0 else 1
        new = info.num_channels - first
        onehot = new_class_targets(targets, first, new)
        logits = output.logits[:, first - 1 :]  # the layout has no background channel
        real = class_bce(logits, onehot, self.pos_weight)
        if info.step == 0:
            return {"mbce": self.mbce * real.sum()}
        assert old_output is not None and self._new is not None
        head, old_head = output.features["head"], old_output.features["head"]
        cells = head.shape[0] * head.shape[-2] * head.shape[-1]
        old_pred = old_prediction(old_output.logits)
        stats = self.stats
        fake = replayed_features(  # the stored statistics live on the CPU (after_training)
            stats["prototypes"],
            stats["norms"],
            stats["noise"],
            self.schedule["per_iteration"],
            self._generator,
        ).to(head.device, head.dtype)
        w_fake = fake.shape[0] / cells
        region = grid_sample_labels((old_pred == 0) & (targets == 0), head.shape[-2:])
        background = head.permute(0, 2, 3, 1)[region]  # (M, D)
        w_bg = self.schedule["extra_bg_ratio"] * float(region.sum()) / cells
        mbce = real
        for rows, weight in ((fake, w_fake), (background, w_bg)):
            if rows.shape[0] > 0:
                out = F.linear(rows, self._new.weight.flatten(1), self._new.bias)
                mbce = mbce + weight * class_bce(
                    out.t()[None, :, :, None], torch.zeros_like(out.t()[None, :, :, None])
                )
        mbce = mbce / (1 + w_bg + w_fake)
        region_old = (targets == 0) & (old_pred > 0)
        stored = stats["prototypes"].to(head.device)
        stored = stored[stored.norm(dim=1) > 0]  # a class stored without pixels has none
        return {
            "mbce": self.mbce * mbce.sum(),
            "pkd": self.pkd * ocfm_loss(head, old_head, region_old),
            "cont": self.cont * sad_loss(head, onehot, stored),
        }

    # -- after training: the statistics of the step's classes ------------------------------
    @torch.no_grad()
    def after_training(self, data: StepData, info: StepInfo, model: nn.Module) -> None:
        """B:169-278 in one pass over the step's batches (final model, eval mode): per new class
        the sums of the unit features, of their squares, of the norms and their squares, and the
        cell count; the prototype, norm mean / std (unbiased) and noise follow from them."""
        first = info.num_old_channels if info.step > 0 else 1
        new = info.num_channels - first
        dim = model.head_channels
        sums = torch.zeros(new, dim, dtype=torch.float64, device=data.device)
        squares = torch.zeros_like(sums)
        norm_sums = torch.zeros(new, 2, dtype=torch.float64, device=data.device)
        count = torch.zeros(new, dtype=torch.float64, device=data.device)
        background = torch.zeros((), dtype=torch.float64, device=data.device)
        model.eval()
        for images, targets in data.batches(0):
            with data.autocast():
                head = model(images, features=("head",)).features["head"]
            head = head.double()
            labels = grid_sample_labels(targets.long(), head.shape[-2:])
            unit = F.normalize(head, p=2, dim=1)
            norms = head.norm(dim=1)
            onehot = new_class_targets(labels, first, new).double()  # (B, N, h, w)
            sums += torch.einsum("bdhw,bnhw->nd", unit, onehot)
            squares += torch.einsum("bdhw,bnhw->nd", unit.pow(2), onehot)
            norm_sums[:, 0] += torch.einsum("bhw,bnhw->n", norms, onehot)
            norm_sums[:, 1] += torch.einsum("bhw,bnhw->n", norms.pow(2), onehot)
            count += onehot.sum(dim=(0, 2, 3))
            background += (labels == 0).sum()
        for tensor in (sums, squares, norm_sums, count, background):
            data.sum_over_processes(tensor)
        if bool((count == 0).any()):
            missing = [info.class_names[first + i] for i in range(new) if count[i] == 0]
            log.warning(
                f"STAR: no training pixel of {missing} on the feature grid of step {info.step}: "
                "its prototype, norms and noise are stored as zeros (the official code stops)"
            )
        prototypes = F.normalize(sums, p=2, dim=1)
        seen = count.clamp(min=1)
        mean = norm_sums[:, 0] / seen
        std = ((norm_sums[:, 1] - count * mean**2) / (count - 1).clamp(min=1)).clamp(min=0).sqrt()
        old = self.stats.get("prototypes")
        around = prototypes
        if info.step > 0 and self.noise == "official":
            # B:235, 259: new class k is compared with row k of cat(old, new), an old prototype.
            around = torch.cat([old.to(sums), prototypes])[:new]
        # mean over cells of (u - p)^2 per channel = (sum u^2 - 2 p sum u + n p^2) / n
        spread = squares - 2 * around * sums + count[:, None] * around**2
        noise = (spread / seen[:, None]).clamp(min=0).sqrt() * (count > 0)[:, None]
        if info.step == 0:
            numbers = torch.cat([background.view(1), count]).cpu()
            merged = {"prototypes": prototypes, "norms": torch.stack([mean, std]), "noise": noise}
        else:
            numbers = self.schedule["numbers"]
            merged = {
                "prototypes": torch.cat([old.to(sums), prototypes]),
                "norms": torch.cat([self.stats["norms"].to(sums), torch.stack([mean, std])], 1),
                "noise": torch.cat([self.stats["noise"].to(sums), noise]),
            }
        self.stats = {k: v.float().cpu() for k, v in merged.items()} | {
            "numbers": numbers.double().cpu()
        }

    def state_dict(self) -> dict[str, Any]:
        return {"stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = dict(state.get("stats", {}))

    def step_state_dict(self) -> dict[str, Any]:
        return {"schedule": dict(self.schedule), "generator": self._generator.get_state()}

    def load_step_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule = dict(state["schedule"])
        self._generator.set_state(state["generator"])

    def memory_pseudo_labels(
        self, old_output: SegmenterOutput, targets: torch.Tensor, info: StepInfo
    ) -> torch.Tensor:
        """Background pixels where the highest class sigmoid is at least 0.9 take that class
        (``utils/memory.py:95-105``, with the channels of STAR's layout; see docs/methods.md)."""
        score, pred = torch.sigmoid(old_output.logits.float()).max(1)
        return torch.where((targets == 0) & (score >= MEMORY_THRESHOLD), pred + 1, targets)
