"""``build_segmenter``: a step's segmenter from names, whichever layout ``model.architecture``
picks (docs/protocol.md "Model"; the sigmoid layouts: :mod:`incseg.models.heads`).

It lives apart from :mod:`incseg.models.segmenter` and :mod:`incseg.models.heads` so that the
dependency points one way: the layouts subclass the plain segmenter, and this module knows both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from incseg.errors import ConfigError
from incseg.models.backbones import build_backbone, download_weights
from incseg.models.deeplab import ASPP_RATES
from incseg.models.heads import LAYOUTS
from incseg.models.mask2former.backbone import ResNetFeatures, TinyFeatures
from incseg.models.mask2former.segmenter import QuerySegmenter
from incseg.models.segmenter import IncrementalSegmenter


def build_segmenter(
    backbone: str,
    channels_per_step: tuple[int, ...],
    *,
    output_stride: int = 16,
    norm: str = "bn",
    head_channels: int = 256,
    pretrained: str = "none",
    architecture: str = "deeplabv3",
    query_sizes: Mapping[str, Any] | None = None,
) -> IncrementalSegmenter | QuerySegmenter:
    """Build the segmenter of a step from names (see :data:`incseg.models.BACKBONES`). The
    ``ssul`` and ``dkd`` architectures are the sigmoid layouts of :mod:`incseg.models.heads`;
    RCIL's is made from the plain one by :func:`incseg.models.rcil.to_rcil` once the pretrained
    weights are in. ``mask2former`` is the query-based model
    (:class:`~incseg.models.mask2former.segmenter.QuerySegmenter`), sized by ``query_sizes``
    (:class:`incseg.config.Mask2FormerConfig`'s fields)."""
    if architecture == "mask2former":
        return QuerySegmenter(
            query_backbone(backbone, norm, pretrained), channels_per_step, query_sizes or {}
        )
    net = build_backbone(backbone, output_stride, norm, pretrained)
    kind = LAYOUTS.get(architecture, IncrementalSegmenter)
    return kind(net, head_channels, channels_per_step, ASPP_RATES[output_stride], norm)


def query_backbone(name: str, norm: str, pretrained: str) -> nn.Module:
    """The res2..res5 backbone of the query-based model: a torchvision ResNet (with
    ``model.pretrained: imagenet``, torchvision's ImageNet weights, the file detectron2's
    ``convert-torchvision-to-d2.py`` converts for CoMFormer, ECLIPSE and SimCIS) with BatchNorm
    or, ``frozen_bn``, torchvision's ``FrozenBatchNorm2d`` (detectron2's FrozenBN, SimCIS's),
    or the tiny CPU backbone."""
    if norm not in ("bn", "frozen_bn") or pretrained == "iabn":
        raise ConfigError(
            "model.norm / model.pretrained: the mask2former architecture takes norm: bn or "
            f"frozen_bn and pretrained: none or imagenet (got norm: {norm}, pretrained: "
            f"{pretrained})"
        )
    if name == "tiny":
        if pretrained != "none":
            raise ConfigError("model.pretrained must be 'none' for the tiny backbone")
        return TinyFeatures()
    net = ResNetFeatures(int(name.removeprefix("resnet")), norm, None)
    if pretrained == "imagenet":
        name = f"ResNet{name.removeprefix('resnet')}_Weights.IMAGENET1K_V1"
        state = {k: v for k, v in download_weights(name).items() if not k.startswith("fc.")}
        net.load_state_dict(state)
    return net
