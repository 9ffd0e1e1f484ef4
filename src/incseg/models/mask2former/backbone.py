"""Backbones returning the ``res2``..``res5`` feature dict Mask2Former's pixel decoder reads.

``ResNetFeatures`` is a torchvision ResNet (stride in the 3x3 conv, "ResNet v1.5"), which is what
detectron2 builds from the converted torchvision weights with ``STRIDE_IN_1X1: False``, as the
ADE20K configs ask (facebookresearch/Mask2Former 9b0651c,
``configs/ade20k/semantic-segmentation/Base-ADE20K-SemanticSegmentation.yaml:5-13``).
detectron2's default ResNet norm is FrozenBN, and those configs leave it (``NORM: "SyncBN"``
is commented out), hence the default ``norm="frozen_bn"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

Tensor = torch.Tensor

FEATURE_NAMES = ("res2", "res3", "res4", "res5")
FEATURE_STRIDES = (4, 8, 16, 32)
_NORMS = {"bn": nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d, "syncbn": nn.SyncBatchNorm}
_RESNETS = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}


class ResNetFeatures(nn.Module):
    """torchvision ResNet-50/101 without pooling and classifier: image -> ``res2``..``res5``.

    Args:
        depth: 50 or 101.
        norm: ``"bn"`` (BatchNorm2d), ``"frozen_bn"`` (torchvision's FrozenBatchNorm2d, the
            detectron2 default) or ``"syncbn"`` (SyncBatchNorm; needs a process group to train).
        weights: a torchvision weights enum or name (e.g. ``ResNet50_Weights.IMAGENET1K_V1``,
            downloaded by torchvision) or None for random init.

    The submodules keep torchvision's names (``conv1``, ``bn1``, ``layer1``..``layer4``), so a
    torchvision ResNet state dict without ``fc.*`` loads. ``forward`` maps (B, 3, H, W) float to
    ``{"res2": (B, 256, H/4, W/4), "res3": (B, 512, H/8, W/8), "res4": (B, 1024, H/16, W/16),
    "res5": (B, 2048, H/32, W/32)}``.
    """

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", weights=None) -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(
                f"ResNetFeatures: depth must be one of {sorted(_RESNETS)}, got {depth}"
            )
        if norm not in _NORMS:
            raise ValueError(f"ResNetFeatures: norm must be one of {sorted(_NORMS)}, got {norm!r}")
        net = _RESNETS[depth](weights=weights, norm_layer=_NORMS[norm])
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )

    def output_shape(self) -> dict[str, tuple[int, int]]:
        """Feature name -> (channels, stride)."""
        widths = (256, 512, 1024, 2048)
        return dict(zip(FEATURE_NAMES, zip(widths, FEATURE_STRIDES)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for name, stage in zip(FEATURE_NAMES, (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = stage(x)
            out[name] = x
        return out


class TinyFeatures(nn.Module):
    """Four small conv stages at strides 4, 8, 16, 32 for CPU tests; same interface as ResNetFeatures.

    Each stage is 3x3 stride-2 conv + BatchNorm + ReLU; the first stage has two, to reach
    stride 4. ``forward`` maps (B, 3, H, W) to ``{"res2": (B, channels[0], H/4, W/4), ...}``.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 48, 64)) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"TinyFeatures: 4 stage widths expected, got {tuple(channels)}")
        self.channels = tuple(channels)

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        first = channels[0]
        self.stages = nn.ModuleList(
            [nn.Sequential(*block(3, first), *block(first, first))]
            + [nn.Sequential(*block(a, b)) for a, b in pairwise(channels)]
        )

    def output_shape(self) -> dict[str, tuple[int, int]]:
        """Feature name -> (channels, stride)."""
        return dict(zip(FEATURE_NAMES, zip(self.channels, FEATURE_STRIDES)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {}
        for name, stage in zip(FEATURE_NAMES, self.stages):
            x = stage(x)
            out[name] = x
        return out
