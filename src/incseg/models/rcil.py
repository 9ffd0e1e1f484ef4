"""RCIL's representation-compensation architecture (Zhang et al., "Representation Compensation
Networks for Continual Semantic Segmentation", CVPR 2022), as the official code builds it
(zhangchbin/RCIL at b9aad58; ``file:line`` below are in that repository).

Every 3x3 conv + norm of the backbone's blocks (the ``conv2`` / ``bn2`` of each ResNet bottleneck,
``modules/residual.py:84-112``; each conv layer of the tiny backbone) and each of the four ASPP
convs (``modules/deeplab.py:24-38``) becomes a :class:`ParallelConvBN`: two conv + norm branches
whose outputs are combined *before* the activation:

- training: per channel, drawn for every forward from the CPU generator (``residual.py:143-155``,
  ``deeplab.py:70-82``): with probability 0.33 the first branch only, 0.33 the second only, else
  their average (each as ``0.5 * (w1 y1 + w2 y2)`` with ``(w1, w2)`` in ``(2, 0), (0, 2), (1, 1)``).
  Each backbone block draws for its own channels; the ASPP draws *once* for its four branches'
  concatenated channels (``deeplab.py:70``, ``(1, 4 * 256, 1, 1)``) after the backbone's draws, and
  :class:`RCILASPP` splits that draw among them;
- evaluation: the average, computed here as *one* conv with both branches' norms folded into it,
  so the evaluated model costs what the plain model costs;
- :meth:`ParallelConvBN.merge` (``run.py:25-112``, at the start of each step > 0): both branches,
  norm folded, averaged into the first branch, whose norm becomes the identity (plus the folded
  bias) and which is frozen from then on (its norm in eval mode, ``run.py:86-105``); the second
  branch keeps its trained weights (it is not re-initialised; ``init_right`` is never called).

The official normalisation is In-Place ABN with activation slope 1.0 (the identity,
``segmentation_module.py:19-21``) followed by explicit LeakyReLU(0.01) layers; incseg's ``iabn``
norm is the same function (BatchNorm + LeakyReLU(0.01)), and In-Place ABN's ``|gamma| + eps`` is
converted when its weights are loaded (:mod:`incseg.models.official`), so the merge folds plain
BatchNorm weights. Two more official choices are kept: the ResNet stem has no activation (its
In-Place ABN has slope 1 and no LeakyReLU follows, ``models/resnet.py:61-66``), and every head
conv is Xavier-initialised with gain 1 (``calculate_gain('leaky_relu', 1.0)``,
``modules/deeplab.py:47-58``); the two head branches start independent, the two backbone
branches as copies (``segmentation_module.py:41-67``). See docs/methods.md, ``rcil``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from incseg.models.deeplab import ASPP
from incseg.models.norm import activation

# Drop-path thresholds of the official code (residual.py:148-153, deeplab.py:74-80).
ONLY_FIRST, ONLY_SECOND = 0.33, 0.66


def draw_drop_path(channels: int) -> torch.Tensor:
    """One drop-path draw: ``(1, channels, 1, 1)`` float32 uniforms in [0, 1) from the CPU
    generator, as ``torch.rand(1, C, 1, 1, dtype=torch.float32)`` (``residual.py:143``,
    ``deeplab.py:70``)."""
    return torch.rand(1, channels, 1, 1, dtype=torch.float32)


def first_branch_weight(draw: torch.Tensor) -> torch.Tensor:
    """``w1`` of a draw (same shape): 2 (first branch only) below 0.33, 0 (second only) below
    0.66, else 1 (the average); the second branch's weight is ``2 - w1`` (``residual.py:146-153``,
    ``deeplab.py:73-80``)."""
    return torch.where(draw < ONLY_FIRST, 2.0, torch.where(draw < ONLY_SECOND, 0.0, 1.0))


def fold(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``(O, I, k, k)`` and bias ``(O,)`` of one conv computing ``norm(conv(x))`` with the
    norm's running statistics (``merge``, ``run.py:26-45``)."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + scale * conv.bias
    return conv.weight * scale[:, None, None, None], bias


class ParallelConvBN(nn.Module):
    """Two conv + BatchNorm branches of the same shape, combined per channel (module docstring).

    ``(B, I, H, W) -> (B, O, H', W')``, before the activation. ``merged`` (a saved buffer) tells
    that the first branch holds an earlier merge: it is frozen and its norm uses its statistics.
    """

    # Evaluate the average of both branches as one folded conv (False: both branches, for checks).
    fold_in_eval: bool = True

    def __init__(
        self,
        conv: nn.Conv2d,
        norm: nn.BatchNorm2d,
        second: tuple[nn.Conv2d, nn.BatchNorm2d] | None = None,
    ) -> None:
        super().__init__()
        self.conv1, self.norm1 = conv, norm
        self.conv2, self.norm2 = second if second is not None else copy.deepcopy((conv, norm))
        self.register_buffer("merged", torch.zeros((), dtype=torch.bool))

    def _conv(self, conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias=None):
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluated average of both branches as one conv's weight and bias."""
        (w1, b1), (w2, b2) = fold(self.conv1, self.norm1), fold(self.conv2, self.norm2)
        return 0.5 * (w1 + w2), 0.5 * (b1 + b2)

    def _folded_cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Evaluation runs many batches with fixed weights: fold once. The key changes whenever a
        # tensor is modified in place (its version counter) or replaced (its storage).
        modules = (self.conv1, self.norm1, self.conv2, self.norm2)
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if getattr(self, "_cache_key", None) != key:
            with torch.no_grad():
                self._cache = self.folded()
            self._cache_key = key
        return self._cache

    def forward(self, x: torch.Tensor, draw: torch.Tensor | None = None) -> torch.Tensor:
        """``draw``: the ``(1, O, 1, 1)`` drop-path draw of this forward in training (None: draw
        it here, as a backbone block does); unused in evaluation."""
        if not self.training and self.fold_in_eval:
            weight, bias = self._folded_cached() if not torch.is_grad_enabled() else self.folded()
            return self._conv(self.conv1, x, weight.to(x.dtype), bias.to(x.dtype))
        if not self.training:
            return 0.5 * (self.norm1(self.conv1(x)) + self.norm2(self.conv2(x)))
        first = self.conv1(x)
        if bool(self.merged):  # frozen: the norm applies its statistics and does not update them
            n = self.norm1
            first = F.batch_norm(
                first, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps
            )
        else:
            first = self.norm1(first)
        second = self.norm2(self.conv2(x))
        if draw is None:
            draw = draw_drop_path(first.shape[1])
        w1 = first_branch_weight(draw).to(first.device)
        return first * (w1 * 0.5).to(first.dtype) + second * ((2.0 - w1) * 0.5).to(first.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold both branches' average into the first branch (``convert_model``,
        ``run.py:72-111``): its conv gets the weights, its norm becomes the identity with the
        folded bias; then :meth:`freeze_first`."""
        weight, bias = self.folded()
        self.conv1.weight.copy_(weight)
        if self.conv1.bias is not None:
            self.conv1.bias.zero_()
        n = self.norm1
        n.running_mean.zero_()
        n.running_var.fill_(1.0)
        n.weight.fill_(float(torch.sqrt(torch.tensor(1.0 + n.eps))))
        n.bias.copy_(bias)
        self.merged.fill_(True)
        self.freeze_first()

    def freeze_first(self) -> None:
        """No gradient for the first branch (after a merge)."""
        self.conv1.requires_grad_(False)
        self.norm1.requires_grad_(False)


class RCILASPP(ASPP):
    """MiB's ASPP (:class:`~incseg.models.deeplab.ASPP`, same modules and state-dict keys) whose
    four branches are :class:`ParallelConvBN` sharing one drop-path draw per training forward:
    ``(1, 4 * hidden, 1, 1)`` drawn at once and split in branch order, as the official head's
    ``r`` over its concatenated branch maps (``deeplab.py:64-82``; the convs and norms before it
    draw nothing, so drawing before them keeps its place in the stream)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        draws: list[torch.Tensor | None] = [None] * len(self.branches)
        if self.training:
            widths = [branch.conv1.out_channels for branch in self.branches]
            draws = list(draw_drop_path(sum(widths)).split(widths, dim=1))
        maps = [branch(x, draw) for branch, draw in zip(self.branches, draws, strict=True)]
        # The rest as ASPP.forward: norm + act, reduction, the pooled branch added, norm + act.
        main = self.reduce(self.branch_norm(torch.cat(maps, dim=1)))
        return self.out_norm(main + self.pool(x))


def parallel_layers(model: nn.Module) -> list[ParallelConvBN]:
    return [m for m in model.modules() if isinstance(m, ParallelConvBN)]


def _resnet_to_rcil(backbone: nn.Module) -> None:
    for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        for block in layer:
            block.conv2 = ParallelConvBN(block.conv2, block.bn2)
            block.bn2 = nn.Identity()
    backbone.relu = nn.Identity()  # the stem's In-Place ABN has slope 1 and nothing follows


def _tiny_to_rcil(backbone: nn.Module) -> None:
    for layer in backbone.layers:
        conv, norm_and_act = layer[0], layer[1]
        layer[0] = ParallelConvBN(conv, norm_and_act[0])
        norm_and_act[0] = nn.Identity()


def _head_to_rcil(head: nn.Module, norm: str) -> None:
    if type(head) is not ASPP:
        raise TypeError(f"RCIL's head is made from MiB's ASPP, not {type(head).__name__}")
    head.__class__ = RCILASPP  # same modules; only the forward changes (one drop-path draw)
    width = head.branches[0].out_channels
    branches = []
    for conv in head.branches:
        twin = copy.deepcopy(conv)
        branches.append(ParallelConvBN(conv, nn.BatchNorm2d(width), (twin, nn.BatchNorm2d(width))))
    head.branches = nn.ModuleList(branches)
    # The shared norm of the four branches is per channel: each branch now has its own two.
    head.branch_norm = nn.Sequential(activation(norm))
    head.reset_parameters(nn.LeakyReLU(1.0))  # Xavier gain 1, every head conv (deeplab.py:47-58)


def to_rcil(model: nn.Module, norm: str) -> nn.Module:
    """Turn an :class:`~incseg.models.segmenter.IncrementalSegmenter` (built, pretrained weights
    loaded) into RCIL's architecture, in place; returns it."""
    backbone = model.backbone
    if hasattr(backbone, "layers"):
        _tiny_to_rcil(backbone)
    else:
        _resnet_to_rcil(backbone)
    _head_to_rcil(model.head, norm)
    return model
