"""Loss functions as pure functions of tensors.

Conventions: ``logits`` are ``(B, C, H, W)`` floating point at input resolution; ``targets`` are
``(B, H, W)`` integer channel indices with 255 = ignore; ``old_logits`` are the frozen old model's
``(B, O, H, W)`` outputs. None of these functions modify their inputs.

Reference: Cermelli et al., "Modeling the Background for Incremental Learning in Semantic
Segmentation", CVPR 2020 (MiB), equations 4-5 and section 3.3; docs/methods.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from incseg.errors import ConfigError
from incseg.protocol.choices import IGNORE_INDEX


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are summed in float32 (logsumexp under autocast); others keep dtype."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _scaled(old_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * old_logits`` (upcast); alpha = 1 (the paper's) returns them without a copy."""
    old_logits = _upcast(old_logits)
    return old_logits if alpha == 1 else alpha * old_logits


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over pixels whose target is not 255. Returns a scalar."""
    return F.cross_entropy(logits, targets.long(), ignore_index=IGNORE_INDEX)


def unbiased_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, num_old: int
) -> torch.Tensor:
    """MiB's unbiased cross-entropy (UNCE).

    The background probability absorbs all old channels:
    ``log p(bg) = logsumexp(z_0..z_{O-1}) - D`` and ``log p(c) = z_c - D`` for new channels
    ``c >= O``, with ``D = logsumexp`` over all channels. Targets in ``1..O-1`` (old classes) count
    as background. Mean negative log-likelihood over pixels not labelled 255.

    Args:
        logits: ``(B, C_t, H, W)``.
        targets: ``(B, H, W)`` channel indices, 255 = ignore.
        num_old: O, channels before this step (background included). ``O <= 1`` gives plain CE.

    Returns:
        Scalar loss (0-dim tensor, dtype of ``logits`` promoted to at least float32).
    """
    if num_old <= 1:
        return cross_entropy(logits, targets)
    logits = _upcast(logits)
    denom = torch.logsumexp(logits, dim=1, keepdim=True)
    log_bg = torch.logsumexp(logits[:, :num_old], dim=1, keepdim=True) - denom
    log_new = logits[:, num_old:] - denom
    log_probs = torch.cat([log_bg, log_new], dim=1)  # channel 0 = bg, k >= 1 = new channel O+k-1
    targets = targets.long()
    shifted = torch.where(targets < num_old, torch.zeros_like(targets), targets - num_old + 1)
    shifted = torch.where(targets == IGNORE_INDEX, targets, shifted)
    return F.nll_loss(log_probs, shifted, ignore_index=IGNORE_INDEX)


def unbiased_cross_entropy_all_pixels(
    logits: torch.Tensor, targets: torch.Tensor, num_old: int
) -> torch.Tensor:
    """MiB's unbiased cross-entropy with ``reduction="none"`` then ``.mean()`` over *all* pixels
    (void pixels count as 0), as the codes built on PLOP's average it (NeST's pre-tuning,
    ECCV24_NeST ``train.py:300-304, 349-350``; RCIL, zhangchbin/RCIL ``train.py:170-173, 470-471``;
    UCD, ygjwd12345/UCD ``train.py:30, 38, 116``, MiB's ``ce_reduction: all``).
    It differs from :func:`unbiased_cross_entropy` as soon as a target is 255. Shapes as there;
    ``num_old`` >= 1."""
    logits = _upcast(logits)
    denom = torch.logsumexp(logits, dim=1)
    log_bg = torch.logsumexp(logits[:, :num_old], dim=1) - denom
    targets = targets.long()
    index = (targets - num_old).clamp(min=0, max=logits.shape[1] - num_old - 1)
    log_new = logits[:, num_old:].gather(1, index[:, None])[:, 0] - denom
    per_pixel = -torch.where(targets < num_old, log_bg, log_new)
    return torch.where(targets == IGNORE_INDEX, torch.zeros_like(per_pixel), per_pixel).mean()


def unbiased_knowledge_distillation(
    logits: torch.Tensor, old_logits: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """MiB's unbiased knowledge distillation (UNKD).

    Soft targets ``q = softmax(alpha * old_logits)`` over the O old channels. The new model's
    background probability absorbs the new channels:
    ``log p(bg) = logsumexp(z_0, z_O..z_{C-1}) - D``; ``log p(c) = z_c - D`` for ``1 <= c < O``.
    Loss ``= -(1/O) sum_c q_c log p(c)``, averaged over all pixels (no ignore mask).

    Args:
        logits: ``(B, C_t, H, W)`` new model outputs.
        old_logits: ``(B, O, H, W)`` old model outputs, ``O < C_t``.
        alpha: temperature-like scale of the old logits (1 in the paper).

    Returns:
        Scalar loss.
    """
    num_old = old_logits.shape[1]
    logits = _upcast(logits)
    denom = torch.logsumexp(logits, dim=1, keepdim=True)
    bg_and_new = torch.cat([logits[:, :1], logits[:, num_old:]], dim=1)
    log_bg = torch.logsumexp(bg_and_new, dim=1, keepdim=True) - denom
    log_old = logits[:, 1:num_old] - denom
    log_probs = torch.cat([log_bg, log_old], dim=1)
    soft = torch.softmax(_scaled(old_logits, alpha), dim=1)
    return -(soft * log_probs).mean(dim=1).mean()


def knowledge_distillation(
    logits: torch.Tensor, old_logits: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """LwF's distillation on the old channels (Li & Hoiem, 2017; as in the MiB paper's baselines).

    The new logits are cut to the O old channels and log-softmaxed over them; the soft targets are
    ``softmax(alpha * old_logits)``. Loss ``= -mean_pixels(mean_c(q_c log p_c))``.

    Args:
        logits: ``(B, C_t, H, W)``; only the first O channels are used.
        old_logits: ``(B, O, H, W)``.
        alpha: scale of the old logits.
    """
    num_old = old_logits.shape[1]
    log_probs = torch.log_softmax(_upcast(logits[:, :num_old]), dim=1)
    soft = torch.softmax(_scaled(old_logits, alpha), dim=1)
    return -(soft * log_probs).mean(dim=1).mean()


def one_hot_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy against one-hot targets over all channels (LwF-MC / iCaRL's classifier
    loss): summed over channels, averaged over pixels not labelled 255."""
    logits = _upcast(logits)
    targets = targets.long()
    valid = targets != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(valid, targets, 0), logits.shape[1]).permute(0, 3, 1, 2)
    per_pixel = F.binary_cross_entropy_with_logits(
        logits, one_hot.to(logits.dtype), reduction="none"
    ).sum(1)
    return per_pixel[valid].mean() if valid.any() else per_pixel.sum() * 0.0


def sigmoid_distillation(logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """LwF-MC's distillation: BCE of the new logits' O old channels against ``sigmoid(old_logits)``,
    averaged over all elements and multiplied by O (so it sums over the old channels)."""
    num_old = old_logits.shape[1]
    bce = F.binary_cross_entropy_with_logits(
        _upcast(logits[:, :num_old]), torch.sigmoid(_upcast(old_logits)), reduction="mean"
    )
    return num_old * bce


def feature_distillation(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """ILT's feature distillation: mean squared error between encoder outputs ``(B, F, h, w)``."""
    return F.mse_loss(_upcast(features), _upcast(old_features))


# ---------------------------------------------------------------------------------------------
# PLOP (Douillard et al., "PLOP: Learning without Forgetting for Continual Semantic Segmentation",
# CVPR 2021). Line numbers cite arthurdouillard/CVPR2021_PLOP at 4b4a060 (``train.py``), whose
# formulas cssegmentation restates (``csseg/modules/runners/plop.py:129-178``).

POD_SCALES = (1, 2, 4)  # the local POD's grids: 1x1, 2x2 and 4x4 regions (``--spp_scales``)


def pixel_mean_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """PLOP's classification loss: per-pixel cross-entropy (0 where the target is 255) times
    ``weights``, averaged over *all* ``B*H*W`` pixels, void ones included (``train.py:76, 351-352``:
    ``CrossEntropyLoss(reduction="none")`` then ``.mean()``). This differs from
    :func:`cross_entropy` (mean over non-void pixels) as soon as a target is 255.

    Args:
        logits: ``(B, C, H, W)``.
        targets: ``(B, H, W)`` channel indices, 255 = ignore.
        weights: a float, or a tensor broadcasting to ``(B, H, W)`` (PLOP: ``(B, 1, 1)``).
    """
    per_pixel = F.cross_entropy(
        _upcast(logits), targets.long(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return (weights * per_pixel).mean()


def local_pod_embedding(x: torch.Tensor, scales: tuple[int, ...] = POD_SCALES) -> torch.Tensor:
    """Local POD embedding of a map (``_local_pod``, ``train.py:979-1014``).

    For each scale ``s`` the map is cut into ``s x s`` square regions of side ``k = W // s`` (the
    width's, for both axes, as PLOP does; trailing rows / columns beyond ``s * k`` are left out);
    each region contributes its mean over the width ``(C, k)`` then its mean over the height
    ``(C, k)``, flattened channel-major. No normalisation (``features_distillation`` forces it off,
    ``train.py:754``). Maps narrower than the
    finest grid, or wider than high, would give empty regions (NaN) and raise :class:`~incseg.errors.ConfigError`.

    Args:
        x: ``(B, C, H, W)``.

    Returns:
        ``(B, D)`` with ``D = sum_s s^2 * 2 * C * k_s`` for square maps.
    """
    batch, width = x.shape[0], x.shape[-1]
    if width < max(scales) or x.shape[-2] < width:
        raise ConfigError(
            f"local POD needs maps at least {max(scales)} wide (its finest grid) and as high as wide; got "
            f"{tuple(x.shape[-2:])}: use a larger data.crop_size or a smaller model.output_stride"
        )
    parts = []
    for scale in scales:
        k = width // scale
        for i in range(scale):
            for j in range(scale):
                region = x[..., i * k : (i + 1) * k, j * k : (j + 1) * k]
                parts.append(region.mean(dim=3).reshape(batch, -1))
                parts.append(region.mean(dim=2).reshape(batch, -1))
    return torch.cat(parts, dim=1)


def merge_new_logits(logits: torch.Tensor, num_old: int) -> torch.Tensor:
    """The student's logits brought to the old model's channels for POD (``extra_channels: sum``,
    ``train.py:817-829``): background = ``z_0 + sum of the new channels' logits``; old classes
    unchanged. ``(B, C, h, w) -> (B, O, h, w)``."""
    background = logits[:, :1] + logits[:, num_old:].sum(dim=1, keepdim=True)
    return torch.cat([background, logits[:, 1:num_old]], dim=1)


def pod_distance(
    old: torch.Tensor, new: torch.Tensor, scales: tuple[int, ...] = POD_SCALES
) -> torch.Tensor:
    """One layer's POD term before its factors (``train.py:839-963``): both maps squared
    (``--pod_prepro pow``), embedded by :func:`local_pod_embedding`, the L2 distance of the two
    embeddings per image, averaged over the batch. Computed in float32.

    Args:
        old, new: ``(B, C, h, w)`` maps of the old and the current model.

    Returns:
        Scalar.
    """
    old_emb = local_pod_embedding(_upcast(old).pow(2), scales)
    new_emb = local_pod_embedding(_upcast(new).pow(2), scales)
    return torch.linalg.vector_norm(old_emb - new_emb, dim=-1).mean()


def local_pod(
    old_maps: list[torch.Tensor],
    new_maps: list[torch.Tensor],
    factors: list[float],
    schedule: float = 1.0,
    scales: tuple[int, ...] = POD_SCALES,
) -> torch.Tensor:
    """PLOP's Local POD loss (``features_distillation``, ``train.py:716-972``):
    ``(1 / L) * sum_l factors[l] * schedule * pod_distance(old_l, new_l)`` over the L maps.

    Args:
        old_maps, new_maps: matching maps, ``(B, C_l, h_l, w_l)`` each; a last pair of logits with
            more channels in ``new`` is merged first (:func:`merge_new_logits`).
        factors: per-map weight (PLOP: ``pod_factor`` for every map but the logits', which get
            the ``switch.after.factor``); a map whose factor is 0 is skipped (``train.py:964-965``).
        schedule: the adaptive factor ``sqrt(C_t / N_t)``, all classes so far over the step's new
            ones (``use_pod_schedule``, ``train.py:968-969``).
    """
    if not (len(old_maps) == len(new_maps) == len(factors)):
        raise ValueError("local_pod: as many old maps, new maps and factors are needed")
    total = torch.zeros((), device=old_maps[0].device)
    for old, new, factor in zip(old_maps, new_maps, factors, strict=True):
        if new.shape[1] != old.shape[1]:
            new = merge_new_logits(new, old.shape[1])
        if factor > 0:
            total = total + factor * schedule * pod_distance(old, new, scales)
    return total / len(old_maps)
