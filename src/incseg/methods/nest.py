"""NeST: new classifier pre-tuning (Xie et al., "Early Preparation Pays Off: New Classifier
Pre-tuning for Class Incremental Semantic Segmentation", ECCV 2024), an add-on to any method
(``method.name: mib+nest``, ``plop+nest``), as the official code computes it
(zhengyuan-xie/ECCV24_NeST at f96185b; every ``file:line`` below is in that repository).

Before a step t > 0 trains, the new classifier is not copied from the background (MiB's init is
skipped: ``run.py:471-476`` calls ``init_new_classifier_simplified`` under ``--warm_up``, whose
norm alignment the pre-tuning overwrites) but *learned as a transformation of the old
classifiers*:

1. Similarity (``train.py:222-282``): over the step's training images, the old model's head
   features ``f`` (``(D,)`` per pixel, the ASPP output) and softmax ``p`` (``(O,)``), both
   bilinearly resized to 128 x 128, and the labels resized with nearest. For every new class n,
   ``S[n, c, d] = mean over pixels labelled n of 1[f_d * W_c,d > 0] * p_c``, W the old classifier
   weights ``(O, D)`` (background row included).
2. Transformation parameters (``segmentation_module.py:383-397, 402-407``): ``A = S`` ``(N, O, D)``,
   ``B = softmax_c(sum_d S[n, c, d])`` ``(N, O)``, a new bias ``(N,)`` (one value repeated), and for the
   background row ``v = 1`` ``(D,)`` and ``s = 1``.
3. Pre-tuning (``train.py:283-388``, ``run.py:568-591``): for ``epochs`` epochs over the step's
   training batches, with every model weight frozen (batch norm still in training mode, so its
   running statistics move, as in the official loop), logits come from the transformed
   classifier (``segmentation_module.py:482-521``): new weights ``w_n = sum_c B[n, c] (A[n, c] *
   W_c)``, new bias as above, background weight ``s * (v * W_0)``, other old rows unchanged; the
   loss is MiB's unbiased cross-entropy averaged over all pixels (``--unce_in_warm``,
   ``train.py:300-304, 349-350``). SGD with Nesterov momentum 0.9, the step's weight decay and LR
   x ``lr_scale`` (``run.py:339-384``), poly schedule over the pre-tuning's iterations, stepped
   *before* each update (``train.py:361-364``), so update k uses ``(1 - (k + 1) / T)^power``.
   Under ``train.amp: fp16`` the loss goes through a dynamic loss scaler of the pre-tuning's own,
   as the official's ``amp.scale_loss`` (``train.py:357-359``; :func:`pretuning_scaler`).
4. Initialisation (``segmentation_module.py:523-555``): the new classifier gets ``w_n`` and the
   bias scaled by ``||old biases|| / ||new bias||``; the background row becomes ``s * (v * W_0)``
   rescaled to the norm of the old one; finally the new weights are scaled by the ratio of the
   mean row norm of the old classifiers to that of the new (``align_weight``, ``:409-432``). The
   background bias is unchanged.

Then the method trains the step as usual. ``epochs: 0`` is NeST off: nothing above happens and the
base method's own init runs (MiB's background-balanced init for ``mib+nest`` and ``plop+nest``),
as an official run without ``--warm_up`` (``run.py:471-476``); the official code with
``--warm_up --warm_epochs 0`` would still install the un-tuned transformation (``run.py:568-591``).

Quirks kept: the initial new bias is the *random* initial bias of a fresh background classifier
(``segmentation_module.py:395`` reads ``cls[0].bias[0]`` before the previous step's weights are
loaded): one draw of ``U(-1/sqrt(D), 1/sqrt(D))`` repeated (``bias_init: random``; ``background``
starts from the trained background bias instead). Not reproduced: a new class without any
pixel in the step's (cropped) training images makes the official ``S`` a 0/0 NaN; incseg keeps the
transformation's Kaiming initialisation for that class (``:391-394``) and logs it. The official
pre-tuning and the step's training share apex's one loss scaler (``amp.initialize`` with both
optimisers, ``run.py:431-433``), so the training starts from the scale and the count of clean
iterations the pre-tuning left; incseg's pre-tuning scaler is its own and the step's starts
afresh (2^16, count 0), so its first doubling may come later. See docs/methods.md, ``nest``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from incseg.losses import unbiased_cross_entropy_all_pixels
from incseg.methods.base import AddOn, StepData
from incseg.methods.ewf import set_old_classifiers_trainable
from incseg.protocol.steps import StepInfo
from incseg.ranges import Range, ranged

if TYPE_CHECKING:
    from collections.abc import Iterable

log = logging.getLogger(__name__)
BiasInit = Literal["random", "background"]


def similarity_sums(
    features: torch.Tensor,
    probs: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    num_old: int,
    num_new: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums behind NeST's similarity ``S`` for one batch (``train.py:257-271``).

    Args:
        features: ``(P, D)`` old-model head features of P pixels.
        probs: ``(P, O)`` old-model softmax over the old channels.
        labels: ``(P,)`` channel indices (new classes are ``O..O+N-1``; others are skipped).
        weights: ``(O, D)`` old classifier weights.
        num_old: O; num_new: N.

    Returns:
        ``(N, O, D)`` sums over each new class's pixels of ``1[f_d W_cd > 0] p_c``, and ``(N,)``
        pixel counts.
    """
    positive, negative = (features > 0).to(probs.dtype), (features < 0).to(probs.dtype)
    sums = features.new_zeros(num_new, num_old, features.shape[1], dtype=probs.dtype)
    counts = torch.zeros(num_new, dtype=probs.dtype, device=features.device)
    for n in range(num_new):
        mask = labels == num_old + n
        if not bool(mask.any()):
            continue
        p = probs[mask]  # (P_n, O)
        # 1[f W > 0] = 1[f > 0] 1[W > 0] + 1[f < 0] 1[W < 0]: two (O, P_n) x (P_n, D) products.
        sums[n] = (p.T @ positive[mask]) * (weights > 0) + (p.T @ negative[mask]) * (weights < 0)
        counts[n] = mask.sum()
    return sums, counts


def transformed_weights(
    scale_new: torch.Tensor, scale_old: torch.Tensor, old_weights: torch.Tensor
) -> torch.Tensor:
    """New classifier weights ``w_n = sum_c B[n, c] (A[n, c] * W_c)`` ``(N, D)`` from ``B``
    ``(N, O)``, ``A`` ``(N, O, D)`` and the old weights ``W`` ``(O, D)``
    (``segmentation_module.py:503-511``)."""
    return torch.einsum("no,nod,od->nd", scale_new, scale_old, old_weights)


def mean_row_norm(weights: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm of the rows of ``(K, D)`` weights (``segmentation_module.py:417-432``)."""
    return weights.norm(dim=1).mean()


def pretuning_scaler(data: StepData) -> torch.amp.GradScaler:
    """The pre-tuning's own dynamic loss scaler, enabled when the run's mixed precision
    (``data.autocast()``) is fp16, as the official pre-tuning scales its loss through apex
    (``train.py:357-359``, ``amp.scale_loss``; O1 in every script, its dynamic scaler: 2^16 at the
    start, halved and the update skipped on an overflow, doubled after 2000 clean iterations,
    which are ``GradScaler``'s defaults). bf16 and float32: disabled (a no-op)."""
    device = data.device.type
    with data.autocast():
        fp16 = torch.is_autocast_enabled(device) and (
            torch.get_autocast_dtype(device) == torch.float16
        )
    return torch.amp.GradScaler(device, enabled=fp16)


def _weights(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight[:, :, 0, 0]


def _old_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([_weights(c) for c in model.classifiers[:-1]])


class Transformation(nn.Module):
    """NeST's learnable transformation for N new classes from O old channels of width D
    (``segmentation_module.py:388-397``): ``scale_old`` A ``(N, O, D)``, ``scale_new`` B
    ``(N, O)``, ``bias`` ``(N,)``, and the background row's ``bg_scale_old`` v ``(D,)`` and
    ``bg_scale_new`` s ``()``."""

    def __init__(self, num_new: int, num_old: int, dim: int, bias: float) -> None:
        super().__init__()
        self.scale_old = nn.Parameter(torch.empty(num_new, num_old, dim))
        self.scale_new = nn.Parameter(torch.empty(num_new, num_old))
        nn.init.kaiming_normal_(self.scale_old, mode="fan_out")
        nn.init.kaiming_normal_(self.scale_new, mode="fan_out")
        self.bias = nn.Parameter(torch.full((num_new,), float(bias)))
        self.bg_scale_old = nn.Parameter(torch.ones(dim))
        self.bg_scale_new = nn.Parameter(torch.ones(()))

    def start_from(self, sums: torch.Tensor, counts: torch.Tensor) -> list[int]:
        """Set A to the similarity ``S = sums / counts`` and B to ``softmax_c(sum_d S)``
        (``segmentation_module.py:402-407``); returns the new classes (0-based) without pixels,
        which keep their initialisation."""
        missing = [n for n, count in enumerate(counts.tolist()) if count == 0]
        with torch.no_grad():
            for n, count in enumerate(counts.tolist()):
                if count > 0:
                    similarity = sums[n] / count
                    self.scale_old[n] = similarity
                    self.scale_new[n] = similarity.sum(dim=-1).softmax(dim=-1)
        return missing

    def background_weight(self, background: torch.Tensor) -> torch.Tensor:
        """``s * (v * w_bg)`` ``(D,)`` (``segmentation_module.py:496-497``)."""
        return self.bg_scale_new * (self.bg_scale_old * background)

    def logits(self, head: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """Pre-tuning logits ``(B, C_t, h, w)`` of head features ``(B, D, h, w)``: the old
        classifiers with the transformed background row, then the transformed new classifier
        (``segmentation_module.py:482-521``)."""
        first = model.classifiers[0]
        first_weight = torch.cat(
            [self.background_weight(_weights(first)[0])[None], _weights(first)[1:]]
        )
        old = [F.conv2d(head, first_weight[:, :, None, None], first.bias)]
        old += [cls(head) for cls in model.classifiers[1:-1]]
        new = transformed_weights(self.scale_new, self.scale_old, _old_weights(model))
        return torch.cat([*old, F.conv2d(head, new[:, :, None, None], self.bias)], dim=1)

    @torch.no_grad()
    def install(self, model: nn.Module) -> None:
        """Write the pre-tuned classifier into ``model`` (``init_via_weight``,
        ``segmentation_module.py:523-555``)."""
        first, new = model.classifiers[0], model.classifiers[-1]
        old_weights = _old_weights(model)
        old_biases = torch.cat([c.bias for c in model.classifiers[:-1]])
        weights = transformed_weights(self.scale_new, self.scale_old, old_weights)
        new.weight.copy_(weights[:, :, None, None])
        new.bias.copy_(self.bias * (old_biases.norm() / self.bias.norm()))
        background = _weights(first)[0]
        fused = self.background_weight(background)
        first.weight[0, :, 0, 0] = fused * (background.norm() / fused.norm())
        gamma = mean_row_norm(_old_weights(model)) / mean_row_norm(_weights(new))
        new.weight.mul_(gamma)


@dataclass
class NeST(AddOn):
    """New classifier pre-tuning before each step > 0 (module docstring).

    Attributes:
        epochs: pre-tuning epochs (``--warm_epochs``: 5 in the VOC scripts, 15 on ADE20K); 0
            turns NeST off, the base method's own classifier init then runs
            (:meth:`replaces_classifier_init`).
        lr_scale: the pre-tuning LR is the step's LR times this (``--warm_lr_scale``: 1 on VOC,
            500 on ADE20K).
        size: side of the square grid the similarity is computed on (128, ``train.py:236-252``).
        bias_init: ``random`` (the official code's random draw, module docstring) or
            ``background`` (the trained background bias).
        freeze_old_classifiers: the old classifiers get no gradient while the step trains
            (``--fix_pre_cls``, set by the PLOP+NeST VOC scripts; ``train.py:422-430``).
    """

    epochs: int = ranged(5, Range(0, 1000, "pre-tuning epochs (5 on VOC, 15 on ADE20K); 0 = off"))
    lr_scale: float = ranged(
        1.0, Range(0, 1e4, "factor on the step's LR (1 on VOC, 500 on ADE20K)", low_open=True)
    )
    size: int = ranged(
        128, Range(1, 4096, "side of the similarity grid (128 in the official code)")
    )
    bias_init: BiasInit = "random"
    freeze_old_classifiers: bool = False

    def replaces_classifier_init(self, info: StepInfo) -> bool:
        """The pre-tuning initialises the new classifier (the base method's init is skipped)
        only at steps > 0 with ``epochs > 0``; ``epochs: 0`` (off) leaves the base method's own
        init (MiB's background-balanced one for ``mib+nest`` and ``plop+nest``), as an official
        run without ``--warm_up`` (``run.py:471-476``)."""
        return info.step > 0 and self.epochs > 0

    def begin_step(self, info: StepInfo, model: nn.Module) -> None:
        if self.freeze_old_classifiers:
            set_old_classifiers_trainable(model, info, trainable=False)

    def prepare_passes(self) -> tuple[int, int]:
        return (self.epochs, 1 if self.epochs else 0)

    def prepare_step(
        self, data: StepData, info: StepInfo, model: nn.Module, old_model: nn.Module
    ) -> None:
        if info.step == 0 or self.epochs == 0:
            return
        transform = self._start(data, info, model, old_model)
        self._pretune(transform, data, info, model)
        transform.install(model)

    def _start(
        self, data: StepData, info: StepInfo, model: nn.Module, old_model: nn.Module
    ) -> Transformation:
        dim = model.classifiers[0].in_channels
        if self.bias_init == "random":
            bound = 1 / math.sqrt(dim)
            bias = float(torch.empty(()).uniform_(-bound, bound))
        else:
            bias = float(model.classifiers[0].bias[0].detach())
        num_old, num_new = info.num_old_channels, info.channels_per_step[-1]
        transform = Transformation(num_new, num_old, dim, bias).to(data.device)
        sums, counts = self._similarity(data.batches(0), old_model, info, data)
        missing = transform.start_from(
            data.sum_over_processes(sums), data.sum_over_processes(counts)
        )
        if missing:
            names = [info.class_names[num_old + n] for n in missing]
            log.warning(
                f"nest: step {info.step}: no training pixel of {names} after cropping; their "
                "transformation keeps its random initialisation"
            )
        return transform

    @torch.no_grad()
    def _similarity(
        self, batches: Iterable, old_model: nn.Module, info: StepInfo, data: StepData
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_old, num_new = info.num_old_channels, info.channels_per_step[-1]
        weights = torch.cat([_weights(c) for c in old_model.classifiers]).float()
        sums, counts = 0.0, 0.0
        size = (self.size, self.size)
        for images, targets in batches:
            with data.autocast():
                out = old_model(images, features=("head",))
            logits = F.interpolate(out.logits.float(), size, mode="bilinear", align_corners=False)
            head = F.interpolate(
                out.features["head"].float(), size, mode="bilinear", align_corners=False
            )
            labels = F.interpolate(targets[:, None].float(), size, mode="nearest")[:, 0].long()
            probs = logits.softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, num_old)
            features = head.permute(0, 2, 3, 1).reshape(-1, head.shape[1])
            batch_sums, batch_counts = similarity_sums(
                features, probs, labels.reshape(-1), weights, num_old, num_new
            )
            sums, counts = sums + batch_sums, counts + batch_counts
        return sums, counts

    def _pretune(
        self, transform: Transformation, data: StepData, info: StepInfo, model: nn.Module
    ) -> None:
        settings = data.sgd_settings
        optimizer = torch.optim.SGD(
            transform.parameters(),
            lr=settings["lr"] * self.lr_scale,
            momentum=settings["momentum"],
            nesterov=settings["nesterov"],
            weight_decay=settings["weight_decay"],
        )
        total = self.epochs * data.batches_per_epoch
        power = settings["lr_power"]
        # The official loop steps its scheduler before the update (train.py:361-364).
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: max(0.0, 1.0 - (it + 1) / max(total, 1)) ** power
        )
        scaler = pretuning_scaler(data)
        trainable = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)
        model.train()
        try:
            for epoch in range(self.epochs):
                for images, targets in data.batches(epoch):
                    optimizer.zero_grad(set_to_none=True)
                    with data.autocast():
                        small = transform.logits(model.head(model.backbone(images)), model)
                    logits = F.interpolate(
                        small.float(), images.shape[-2:], mode="bilinear", align_corners=False
                    )
                    loss = unbiased_cross_entropy_all_pixels(logits, targets, info.num_old_channels)
                    scaler.scale(loss).backward()
                    for p in transform.parameters():  # scaled, as apex's DDP reduces them
                        if p.grad is not None:
                            data.mean_over_processes(p.grad)
                    scaler.step(optimizer)  # unscales; skips the update on inf/NaN gradients
                    scaler.update()
                    schedule.step()
        finally:
            for p, flag in zip(model.parameters(), trainable, strict=True):
                p.requires_grad_(flag)
