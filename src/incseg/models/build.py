"""``build_segmenter``: a step's segmenter from names, whichever layout ``model.architecture``
picks (docs/protocol.md "Model"; the sigmoid layouts: :mod:`incseg.models.heads`).

It lives apart from :mod:`incseg.models.segmenter` and :mod:`incseg.models.heads` so that the
dependency points one way: the layouts subclass the plain segmenter, and this module knows both.
"""

from __future__ import annotations

from incseg.models.backbones import build_backbone
from incseg.models.deeplab import ASPP_RATES
from incseg.models.heads import LAYOUTS
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
) -> IncrementalSegmenter:
    """Build the segmenter of a step from names (see :data:`incseg.models.BACKBONES`). The
    ``ssul`` and ``dkd`` architectures are the sigmoid layouts of :mod:`incseg.models.heads`;
    RCIL's is made from the plain one by :func:`incseg.models.rcil.to_rcil` once the pretrained
    weights are in."""
    net = build_backbone(backbone, output_stride, norm, pretrained)
    kind = LAYOUTS.get(architecture, IncrementalSegmenter)
    return kind(net, head_channels, channels_per_step, ASPP_RATES[output_stride], norm)
