"""The classifier layouts of the sigmoid family (SSUL, DKD, STAR): torchvision's DeepLabV3 head instead
of MiB's, one classifier per step, one sigmoid per channel (docs/methods.md, ``ssul``, ``dkd``).

Both official codes build the head from torchvision's ASPP (a 1x1 and three atrous 3x3
conv-BN-ReLU branches, image pooling upsampled bilinearly, concatenated, a 1x1 projection with
BN, ReLU and ``Dropout(0.1)``; clovaai/SSUL ``network/_deeplab.py:166-195``, cvlab-yonsei/DKD
``models/modules/aspp.py:77-126``); torchvision's :class:`~torchvision.models.segmentation.
deeplabv3.ASPP` is that module with dropout 0.5, so incseg uses it with 0.1. Every conv of the head
and classifiers is Kaiming-normal initialised, BN weights 1 and biases 0 (SSUL ``_deeplab.py:
105-111``, DKD ``aspp.py:157-162``, ``model.py:101-108``); conv biases keep PyTorch's default.
The backbone's BN momentum is 0.01 (SSUL ``main.py:224``, DKD ``train_voc.py:101``).

Layouts (logit channels in order; incseg's channel ``k`` is the step's class ``order[k]``, 0 the
background):

- ``ssul`` (:class:`UnknownSegmenter`): ``[unknown, background, class 1, ...]``, ``C_t + 1``
  channels; every step's classifier is a head of its own (3x3 conv, BN, ReLU, 1x1 conv; SSUL
  ``_deeplab.py:84-103``); step 0 has three: unknown, background and its objects
  (``main.py:186-188``). Prediction: sigmoids, the unknown's added to the background's, argmax
  (``main.py:163-170``).
- ``dkd`` (:class:`AuxiliarySegmenter`): ``[auxiliary, class 1, ...]``, ``C_t`` channels: no
  background classifier; channel 0 is an auxiliary 1x1 classifier on *detached* features
  (DKD ``model.py:41, 67-75``); the head ends with one more 3x3 conv-BN-ReLU (``aspp.py:122-126``).
  Prediction: the argmax of the class sigmoids, background where none exceeds 0.5
  (``trainer_voc.py:231-237``).
- ``star`` (:class:`ObjectSegmenter`): DKD's without the auxiliary classifier, ``[class 1, ...]``,
  ``C_t - 1`` channels (jinpeng0528/STAR ``models/model.py:41``); prediction as DKD's.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar

import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP

from incseg.models.segmenter import IncrementalSegmenter, SegmenterOutput

BACKBONE_BN_MOMENTUM = 0.01


def kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal conv weights (biases left as PyTorch made them), BN weights 1, biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SigmoidHead(nn.Sequential):
    """torchvision's ASPP with ``Dropout(0.1)`` (module docstring), plus DKD's last 3x3 conv-BN-ReLU
    when ``last_conv``. ``(B, in, h, w) -> (B, out, h, w)``, non-negative (ends in a ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, rates, last_conv: bool) -> None:
        aspp = TorchvisionASPP(in_channels, rates, out_channels)
        aspp.project[3] = nn.Dropout(0.1)
        layers = [aspp]
        if last_conv:
            layers += [
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)
        kaiming_init(self)


class SSULHead(nn.Sequential):
    """One SSUL classifier: 3x3 conv (no bias), BN, ReLU, 1x1 conv to ``out_channels``
    (SSUL ``_deeplab.py:84-92``)."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, out_channels, 1),
        )
        kaiming_init(self)
        self.out_channels = out_channels


class SSULFirstHeads(nn.Module):
    """Step 0's three SSUL heads: ``unknown`` (1), ``background`` (1) and ``objects``
    (``classes - 1``); output ``[unknown, background, objects]``. ``out_channels`` counts the
    step's classes (background included), not the unknown."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.unknown = SSULHead(channels, 1)
        self.background = SSULHead(channels, 1)
        self.objects = SSULHead(channels, classes - 1)
        self.out_channels = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.unknown(x), self.background(x), self.objects(x)], dim=1)


class AuxiliaryFirst(nn.Module):
    """DKD's step-0 classifiers: the auxiliary 1x1 conv on detached features (channel 0) and the
    step's object classes (``classes - 1``); without ``auxiliary`` (STAR) the object classes
    only. ``out_channels`` = ``classes`` (the background's place counted either way)."""

    def __init__(self, channels: int, classes: int, auxiliary: bool = True) -> None:
        super().__init__()
        self.auxiliary = nn.Conv2d(channels, 1, 1) if auxiliary else None
        self.objects = nn.Conv2d(channels, classes - 1, 1)
        kaiming_init(self)
        self.out_channels = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.auxiliary is None:
            return self.objects(x)
        # The auxiliary classifier's gradient stops at its input (DKD model.py:71).
        return torch.cat([self.auxiliary(x.detach()), self.objects(x)], dim=1)


class _SigmoidSegmenter(IncrementalSegmenter):
    """Shared by the two layouts: torchvision's head, BN momentum 0.01 in the backbone, and
    ``frozen_norm`` / ``frozen_dropout`` flags that keep those layers in eval mode while the model
    trains (SSUL ``network/utils.py:21-30``, DKD ``model.py:117-125, 150-153``)."""

    last_conv: ClassVar[bool] = False

    def __init__(self, backbone, head_channels, channels_per_step, rates, norm) -> None:
        super().__init__(backbone, head_channels, channels_per_step, rates, norm)
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = BACKBONE_BN_MOMENTUM
        self.frozen_norm = False
        self.frozen_dropout = False

    def make_head(self, in_channels: int, out_channels: int, rates, norm: str) -> nn.Module:
        return SigmoidHead(in_channels, out_channels, rates, self.last_conv)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for m in self.modules():
                if (self.frozen_norm and isinstance(m, nn.BatchNorm2d)) or (
                    self.frozen_dropout and isinstance(m, nn.Dropout)
                ):
                    m.eval()
        return self


class UnknownSegmenter(_SigmoidSegmenter):
    """SSUL's layout (module docstring): logits ``(B, C_t + 1, H, W)``, channel 0 the unknown."""

    def make_classifier(self, num_channels: int) -> nn.Module:
        if len(self.classifiers) == 0:
            return SSULFirstHeads(self.head_channels, num_channels)
        return SSULHead(self.head_channels, num_channels)

    @staticmethod
    def scores(logits: torch.Tensor) -> torch.Tensor:
        """``(B, C_t + 1, H, W)`` logits -> ``(B, C_t, H, W)`` scores whose argmax is SSUL's
        prediction: sigmoids, the background's plus the unknown's (``main.py:163-170``)."""
        prob = torch.sigmoid(logits.float())
        return torch.cat([prob[:, 1:2] + prob[:, :1], prob[:, 2:]], dim=1)


class AuxiliarySegmenter(_SigmoidSegmenter):
    """DKD's layout (module docstring): logits ``(B, C_t, H, W)``, channel 0 the auxiliary
    classifier. Two more maps can be asked for by name: ``logits_pos`` / ``logits_neg``
    ``(B, C_t - 1, h, w)``, the class logits at feature resolution from the positive / negative
    parts of the weights, without bias (:func:`decomposed_logits`)."""

    last_conv: ClassVar[bool] = True
    auxiliary: ClassVar[bool] = True

    def make_classifier(self, num_channels: int) -> nn.Module:
        if len(self.classifiers) == 0:
            return AuxiliaryFirst(self.head_channels, num_channels, self.auxiliary)
        conv = nn.Conv2d(self.head_channels, num_channels, 1)
        kaiming_init(conv)
        return conv

    def class_weights(self) -> torch.Tensor:
        """``(C_t - 1, D)`` 1x1 weights of the class channels (the auxiliary's left out)."""
        convs = [self.classifiers[0].objects, *self.classifiers[1:]]
        return torch.cat([c.weight.flatten(1) for c in convs])

    def forward(self, images: torch.Tensor, features: Collection[str] = ()) -> SegmenterOutput:
        split = {"logits_pos", "logits_neg"} & set(features)
        if not split:
            return super().forward(images, features)
        rest = [f for f in features if f not in split]
        output = super().forward(images, dict.fromkeys([*rest, "head"]))
        pos, neg = decomposed_logits(output.features["head"], self.class_weights())
        maps = {"logits_pos": pos, "logits_neg": neg} | output.features
        return SegmenterOutput(output.logits, {name: maps[name] for name in features})

    @staticmethod
    def scores(logits: torch.Tensor) -> torch.Tensor:
        """``(B, C_t, H, W)`` logits -> scores whose argmax is DKD's prediction: 0.5 in channel
        0 (the auxiliary's place), the class sigmoids after it; the first maximum wins, so a pixel
        is background unless a class sigmoid exceeds 0.5 (``trainer_voc.py:231-237``)."""
        prob = torch.sigmoid(logits.float())
        return torch.cat([torch.full_like(prob[:, :1], 0.5), prob[:, 1:]], dim=1)


class ObjectSegmenter(AuxiliarySegmenter):
    """STAR's layout (jinpeng0528/STAR ``models/model.py:41``): DKD's without the auxiliary
    classifier, so no channel for the background at all: logits ``(B, C_t - 1, H, W)``, channel
    ``k - 1`` for the step's channel ``k``. Prediction as DKD's (``trainer_voc.py:182-186``)."""

    auxiliary: ClassVar[bool] = False

    @staticmethod
    def scores(logits: torch.Tensor) -> torch.Tensor:
        """``(B, C_t - 1, H, W)`` logits -> ``(B, C_t, H, W)``: 0.5 for the background, then the
        class sigmoids (the background wins unless a class sigmoid exceeds 0.5)."""
        prob = torch.sigmoid(logits.float())
        return torch.cat([torch.full_like(prob[:, :1], 0.5), prob], dim=1)


def decomposed_logits(
    features: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's positive and negative logits (``model.py:77-99``): ``x . max(w, 0)`` and
    ``x . min(w, 0)`` per class, no bias.

    Args:
        features: ``(B, D, h, w)`` classifier input (non-negative in DKD's head).
        weight: ``(K, D)`` class weights.

    Returns:
        ``(B, K, h, w)`` positive and negative parts; their sum is the bias-free logit.
    """
    pos = torch.einsum("bdhw,kd->bkhw", features, weight.clamp(min=0))
    neg = torch.einsum("bdhw,kd->bkhw", features, weight.clamp(max=0))
    return pos, neg


LAYOUTS = {"ssul": UnknownSegmenter, "dkd": AuxiliarySegmenter, "star": ObjectSegmenter}
