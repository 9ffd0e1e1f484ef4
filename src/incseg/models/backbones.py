"""Backbones: torchvision ResNets (dilated to output stride 16 or 8) and a tiny CPU backbone.

Every backbone maps ``(B, 3, H, W)`` float images to ``(B, out_channels, H/OS, W/OS)`` features
and has an ``out_channels`` attribute. ``forward_stages`` returns the same features together with
the four stages' outputs and their maps *before* the last activation of each stage (PLOP's distilled "attentions",
arthurdouillard/CVPR2021_PLOP ``modules/residual.py:125-138``: the last block of a stage returns
``convs(x) + residual`` beside its activated output); it costs nothing unless called. Backbones are
found by name in :data:`BACKBONES`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from incseg.errors import ConfigError
from incseg.models.choices import BACKBONE_NAMES, OUTPUT_STRIDES, PRETRAINED
from incseg.models.norm import activation, norm_act


class TinyBackbone(nn.Module):
    """A few conv layers (16-64 channels) for CPU demos and tests; random init only.

    Output stride 16 uses four stride-2 convs; output stride 8 replaces the last by a conv with
    dilation 2, as the ResNets do.
    """

    out_channels = 64
    # Last layer index of each of the four stages (output strides 4, 8, 16 or 8, 16 or 8).
    STAGE_ENDS = (1, 2, 4, 5)

    def __init__(self, output_stride: int = 16, norm: str = "bn") -> None:
        super().__init__()

        def conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
            layer = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
            return nn.Sequential(layer, norm_act(cout, norm))

        last = conv(64, 64, stride=2) if output_stride == 16 else conv(64, 64, dilation=2)
        self.layers = nn.Sequential(
            conv(3, 16, stride=2),
            conv(16, 32, stride=2),
            conv(32, 64, stride=2),
            conv(64, 64),
            last,
            conv(64, 64, dilation=1 if output_stride == 16 else 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def forward_stages(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``forward`` plus each stage's last layer after its norm, before its activation, and
        each stage's (activated) output."""
        stages, outputs = [], []
        for index, layer in enumerate(self.layers):
            if index not in self.STAGE_ENDS:
                x = layer(x)
                continue
            conv, (norm, act) = layer
            pre = norm(conv(x))
            x = _activate(act, pre)
            stages.append(pre)
            outputs.append(x)
        return x, stages, outputs


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its pooling and classifier, dilated per output stride.

    OS16 dilates the last stage (dilation 2); OS8 dilates the last two (2 and 4), as DeepLabV3.
    Every 3x3 conv of a dilated stage has the stage's dilation, its first block's too, as the
    ResNet of the official MiB code builds it (fcdl94/MiB ``models/resnet.py:47-51, 104-108``:
    ``_stride_dilation`` gives each block of a stage the same dilation). torchvision's
    ``replace_stride_with_dilation`` keeps the previous stage's dilation in that first conv (1 at
    OS16); the weights' shapes are the same either way, so official and torchvision state dicts
    both load. Submodule names are torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``).
    """

    def __init__(self, depth: int, output_stride: int, norm: str, weights: str | None) -> None:
        super().__init__()
        dilate = [False, False, True] if output_stride == 16 else [False, True, True]
        builder = getattr(torchvision.models, f"resnet{depth}")
        net = builder(weights=None, replace_stride_with_dilation=dilate)
        if weights is not None:
            net.load_state_dict(download_weights(f"ResNet{depth}_Weights.{weights}"))
        for layer in (net.layer3, net.layer4):
            dilation = layer[-1].conv2.dilation
            layer[0].conv2.dilation = layer[0].conv2.padding = dilation
        if norm == "iabn":
            _replace_relu(net, norm)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.out_channels = net.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_stages(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``forward`` plus, per stage, its last block's ``bn3(conv3(.)) + shortcut`` before the
        activation (PLOP ``models/resnet.py:118-148``, ``modules/residual.py:125-138``), and each
        stage's (activated) output."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages, outputs = [], []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer[:-1]:
                x = block(x)
            x, pre = _bottleneck_with_pre_activation(layer[-1], x)
            stages.append(pre)
            outputs.append(x)
        return x, stages, outputs


def _activate(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act`` applied out of place, so that ``x`` (a distilled map) survives."""
    if isinstance(act, nn.LeakyReLU):
        return F.leaky_relu(x, act.negative_slope)
    return F.relu(x)


def _bottleneck_with_pre_activation(
    block: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ``Bottleneck.forward`` returning (output, the sum before the last activation)."""
    shortcut = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    pre = block.bn3(block.conv3(out)) + shortcut
    return _activate(block.relu, pre), pre


def _replace_relu(module: nn.Module, norm: str) -> None:
    """Swap every ReLU for the activation of ``norm`` (LeakyReLU 0.01 for ``iabn``)."""
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, activation(norm))
        else:
            _replace_relu(child, norm)


def download_weights(name: str) -> dict[str, torch.Tensor]:
    """Fetch torchvision weights ``name`` (e.g. ``ResNet101_Weights.IMAGENET1K_V1``).

    Raises:
        ConfigError: the file is neither cached nor downloadable; the message names the URL and
            the cache folder to place it in.
    """
    weights = torchvision.models.get_weight(name)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    filename = weights.url.rsplit("/", 1)[-1]
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise ConfigError(
            f"cannot load pretrained weights {name}: {err}. Without network access, download "
            f"{weights.url} elsewhere and place it at {cache / filename}, "
            "or set model.pretrained=none"
        ) from None


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(output_stride: int, norm: str, pretrained: str) -> nn.Module:
        weights = "IMAGENET1K_V1" if pretrained == "imagenet" else None
        return ResNetBackbone(depth, output_stride, norm, weights)

    return build


def _tiny(output_stride: int, norm: str, pretrained: str) -> nn.Module:
    if pretrained != "none":
        raise ConfigError(
            "model.pretrained must be 'none' for the tiny backbone (no weights exist)"
        )
    return TinyBackbone(output_stride, norm)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "tiny": _tiny,
    "resnet50": _resnet(50),
    "resnet101": _resnet(101),
}
assert set(BACKBONES) == set(BACKBONE_NAMES)  # the light name table (models/choices.py)


def build_backbone(name: str, output_stride: int, norm: str, pretrained: str = "none") -> nn.Module:
    """Build backbone ``name``; unknown names list the registered ones."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(
            f"output stride {output_stride} not supported; expected one of {OUTPUT_STRIDES}"
        )
    if pretrained not in PRETRAINED:
        raise ConfigError(
            f"unknown pretrained weights {pretrained!r}; expected one of {PRETRAINED}"
        )
    return BACKBONES[name](output_stride=output_stride, norm=norm, pretrained=pretrained)
