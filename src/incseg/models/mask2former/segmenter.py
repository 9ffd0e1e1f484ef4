"""Mask2Former as an incremental segmenter (``model.architecture: mask2former``): backbone,
deformable pixel decoder, masked-attention transformer decoder, and a class head that grows by one
linear layer per step (docs/methods.md "Mask2Former").

The class head: Mask2Former's ``class_embed`` is one ``Linear(hidden, K + 1)``, the last output
the no-object class (facebookresearch/Mask2Former ``mask2former_transformer_decoder.py:308-309``).
Here it is one ``Linear(hidden, C_s)`` per step ``s`` (channel ``k`` for the step's class
``order[k]``, step 0's channel 0 the background, as every incseg model) and one
``Linear(hidden, 1)`` for no-object, concatenated in that order: the same function, and each row
initialised as PyTorch initialises a ``Linear`` of that input width, so a model of one step is
distributed as the official head.

With ``background: false`` (ADE20K's 0 is void: Mask2Former and CoMFormer train no class for
it) step 0's layer has no row for channel 0: class index ``k`` of the logits is channel ``k + 1``
(:attr:`QueryOutput.first_channel`), and a pixel that no query claims is predicted 0.

The engine sees the segmenter interface of :class:`incseg.models.segmenter.IncrementalSegmenter`:
``classifiers``, ``channels_per_step``, ``add_classifier``, ``forward`` and
``prediction_scores`` (the semantic inference, ``maskformer_model.py:366-370``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from incseg.comformer_losses import comformer_inference
from incseg.models.choices import QUERY_FEATURE_NAMES
from incseg.models.mask2former.decoder import MLP, DecoderSizes, MultiScaleMaskedTransformerDecoder
from incseg.models.mask2former.pixel_decoder import MSDeformAttnPixelDecoder, PixelDecoderSizes
from incseg.models.mask2former.prompts import PromptedDecoder
from incseg.models.mask2former.selection import SelectionDecoder, SelectionInputs
from incseg.query_losses import semantic_inference
from incseg.simcis_losses import simcis_inference

# MODEL.MASK_FORMER.SIZE_DIVISIBILITY of every ADE20K config: images are padded with zeros (after
# normalisation) to multiples of it (maskformer_model.py:276, detectron2 ImageList.from_tensors).
SIZE_DIVISIBILITY = 32


@dataclass
class QueryOutput:
    """What the query-based model returns for ``(B, 3, H, W)`` images.

    Attributes:
        pred_logits: ``(B, Q, C_t + 1)`` class logits per query, the last no-object; with
            SimCIS's static head (``class_head: static``) ``(B, Q, C)`` over every class of the
            setting, seen or not, and no no-object.
        pred_masks: ``(B, Q, H/4, W/4)`` mask logits per query.
        aux_outputs: the same pair for each earlier prediction of the decoder (deep
            supervision), as ``{"pred_logits", "pred_masks"}`` dicts.
        size: ``(H, W)`` of the input, what predictions are scored at.
        padded: ``(H', W')``, the input padded to multiples of :data:`SIZE_DIVISIBILITY`, what
            the masks cover.
        first_channel: the channel of class index 0 of the logits: 0, or 1 when the head has no
            background class.
        queries: the decoder's query states per prediction ``(B, Q, hidden)``, only when asked
            for (feature name ``queries``); empty otherwise.
        maps: the backbone's res2-res5 (after their last ReLU) and the pixel decoder's
            ``mask_features``, only when asked for (feature name ``maps``, what CoMFormer's
            PLOP distils, ``continual/method_wrapper/maskformer.py:11-20``); empty otherwise.
        extras: what SimCIS's decoder returns besides (``decoder: selection``,
            :meth:`incseg.models.mask2former.selection.SelectionDecoder.forward`):
            ``pred_boxes``, ``interm``, ``topk``, ``selected`` and ``distill``; empty otherwise.
    """

    pred_logits: torch.Tensor
    pred_masks: torch.Tensor
    aux_outputs: list[dict[str, torch.Tensor]]
    size: tuple[int, int]
    first_channel: int = 0
    queries: list[torch.Tensor] = field(default_factory=list)
    padded: tuple[int, int] | None = None
    maps: list[torch.Tensor] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The official output dict (``pred_logits``, ``pred_masks``, ``aux_outputs``)."""
        return {
            "pred_logits": self.pred_logits,
            "pred_masks": self.pred_masks,
            "aux_outputs": self.aux_outputs,
        }


class IncrementalClassHead(nn.Module):
    """``(B, Q, hidden) -> (B, Q, C_t + 1)``: each step's classes, then no-object; each a
    ``Linear`` or, with ``deep``, ECLIPSE's 3-layer MLP (``CONT.DEEP_CLS``, clovaai/ECLIPSE
    ``continual/modeling/classifier.py:48-70``)."""

    def __init__(self, hidden_dim: int, deep: bool = False) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.deep = deep
        self.classifiers = nn.ModuleList()
        self.no_object = self.layer(1)

    def layer(self, outputs: int) -> nn.Module:
        if self.deep:
            return MLP(self.hidden_dim, self.hidden_dim, outputs, 3)
        return nn.Linear(self.hidden_dim, outputs)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return torch.cat([c(queries) for c in self.classifiers] + [self.no_object(queries)], -1)


class ClassSlice(nn.Module):
    """A step's classes in :class:`StaticClassHead`: their number, no parameters."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features


class StaticClassHead(nn.Module):
    """SimCIS's class head: one ``Linear(hidden, C)`` over every class ``C`` of the setting
    from step 0 on, seen or not, and no no-object output (``nn.Linear(hidden_dim, 150)``,
    SooLab/SimCIS ``mask2former_transformer_decoder.py:377``); future classes' rows are trained
    as negatives by the sigmoid focal loss until their step. ``classifiers`` holds one
    :class:`ClassSlice` per step, so that the model counts its steps' classes as every incseg
    model does."""

    def __init__(self, hidden_dim: int, num_classes: int) -> None:
        super().__init__()
        self.full = nn.Linear(hidden_dim, num_classes)
        self.classifiers = nn.ModuleList()

    def layer(self, outputs: int) -> nn.Module:
        return ClassSlice(outputs)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.full(queries)


class QuerySegmenter(nn.Module):
    """Mask2Former with a class head that grows per step.

    Args:
        backbone: returns a dict of feature maps and has ``output_shape()`` (name -> (channels,
            stride)): :mod:`incseg.models.mask2former.backbone`.
        channels_per_step: classes of steps 0..t (step 0's include the background).
        sizes: :class:`incseg.config.Mask2FormerConfig`'s fields.
    """

    def __init__(
        self, backbone: nn.Module, channels_per_step: tuple[int, ...], sizes: Mapping[str, Any]
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            backbone.output_shape(),
            PixelDecoderSizes(
                conv_dim=sizes["conv_dim"],
                mask_dim=sizes["mask_dim"],
                encoder_layers=sizes["enc_layers"],
                heads=sizes["nheads"],
                dim_feedforward=sizes["enc_dim_feedforward"],
            ),
        )
        decoder_sizes = DecoderSizes(
            hidden_dim=sizes["hidden_dim"],
            num_queries=sizes["num_queries"],
            nheads=sizes["nheads"],
            dim_feedforward=sizes["dim_feedforward"],
            dec_layers=sizes["dec_layers"],
            mask_dim=sizes["mask_dim"],
            mask_activation=sizes["mask_activation"],
        )
        prompts = sizes.get("prompts", 0)
        # num_classes=1: the class head is replaced by the growing one below
        if prompts:
            self.predictor = PromptedDecoder(sizes["conv_dim"], 1, decoder_sizes, prompts)
            self.predictor.deltas = list(sizes.get("logit_deltas", ()))
        elif sizes.get("decoder", "masked") == "selection":
            self.predictor = SelectionDecoder(sizes["conv_dim"], 1, decoder_sizes)
        else:
            self.predictor = MultiScaleMaskedTransformerDecoder(sizes["conv_dim"], 1, decoder_sizes)
        head = sizes.get("class_head", "linear")
        if head == "static":
            total = sizes["total_classes"]
            self.predictor.class_embed = StaticClassHead(sizes["hidden_dim"], total)
        else:
            self.predictor.class_embed = IncrementalClassHead(sizes["hidden_dim"], head == "mlp")
        # what the next forward passes to SimCIS's decoder (set by the method, used once)
        self.selection_inputs: SelectionInputs | None = None
        self.background = sizes.get("background", True)
        self.inference = sizes.get("inference", "semantic")
        for num in channels_per_step:
            self.add_classifier(num)

    @property
    def classifiers(self) -> nn.ModuleList:
        return self.predictor.class_embed.classifiers

    @property
    def first_channel(self) -> int:
        return 0 if self.background else 1

    @property
    def channels_per_step(self) -> tuple[int, ...]:
        """Channels of steps 0..t as every incseg model counts them (step 0's with the
        background, whether or not the head has a row for it)."""
        sizes = [_outputs(c) for c in self.classifiers]
        if sizes:
            sizes[0] += self.first_channel
        return tuple(sizes)

    @property
    def num_channels(self) -> int:
        return sum(self.channels_per_step)

    def add_classifier(self, num_channels: int) -> nn.Module:
        """Append the next step's classifier (a ``Linear(hidden, num_channels)`` or an MLP) on the
        model's device (step 0's without the background row when the head has none), and after
        step 0 the step's prompt group when the decoder has prompts."""
        head = self.predictor.class_embed
        if not self.classifiers:
            num_channels -= self.first_channel
        elif isinstance(self.predictor, PromptedDecoder):
            self.predictor.add_prompt_group()
        ref = next(head.parameters())
        layer = head.layer(num_channels).to(device=ref.device, dtype=ref.dtype)
        self.classifiers.append(layer)
        if isinstance(self.predictor, PromptedDecoder):
            self.predictor.class_groups = [_outputs(c) for c in self.classifiers]
        return layer

    def forward(self, images: torch.Tensor, features: Collection[str] = ()) -> QueryOutput:
        """``(B, 3, H, W)`` normalised images -> :class:`QueryOutput`. Feature names:
        ``queries`` (the decoder's query states per prediction) and ``maps`` (backbone and
        pixel-decoder maps, :attr:`QueryOutput.maps`).

        Images whose sides are not multiples of :data:`SIZE_DIVISIBILITY` are padded with zeros
        at the bottom and right, as the official model pads its test images; in training that
        would misplace the targets, so training images must come padded (the mapper pads its
        crops) and others are refused."""
        unknown = set(features) - set(QUERY_FEATURE_NAMES)
        if unknown:
            raise ValueError(
                f"unknown feature names {sorted(unknown)}; valid: {list(QUERY_FEATURE_NAMES)}"
            )
        size = (images.shape[-2], images.shape[-1])
        pad_h, pad_w = -size[0] % SIZE_DIVISIBILITY, -size[1] % SIZE_DIVISIBILITY
        if pad_h or pad_w:
            if self.training:
                raise ValueError(
                    f"training images of {size[0]}x{size[1]}: Mask2Former needs sides divisible "
                    f"by {SIZE_DIVISIBILITY}"
                )
            images = F.pad(images, (0, pad_w, 0, pad_h))
        maps = self.backbone(images)
        mask_features, _, multi_scale = self.pixel_decoder.forward_features(maps)
        if isinstance(self.predictor, SelectionDecoder):
            inputs, self.selection_inputs = self.selection_inputs, None
            out = self.predictor(multi_scale, mask_features, inputs=inputs)
        else:
            out = self.predictor(multi_scale, mask_features, return_queries="queries" in features)
        return QueryOutput(
            out["pred_logits"],
            out["pred_masks"],
            out["aux_outputs"],
            size,
            self.first_channel,
            out.get("queries", []),
            (images.shape[-2], images.shape[-1]),
            [*maps.values(), mask_features] if "maps" in features else [],
            {
                k: out[k]
                for k in ("pred_boxes", "interm", "topk", "selected", "distill")
                if k in out
            },
        )

    def prediction_scores(self, output: QueryOutput) -> torch.Tensor:
        """``(B, C_t, H, W)`` scores at input size whose argmax is the prediction: the masks
        upsampled bilinearly to the padded input (``maskformer_model.py:202-207``), then
        Mask2Former's :func:`~incseg.query_losses.semantic_inference` (without a background class, channel 0
        scores 0 and so is predicted only where every class scores 0) or, with ``inference:
        comformer``, the one-hot of CoMFormer's
        :func:`~incseg.comformer_losses.comformer_inference` (a pixel no query paints: 0)."""
        height, width = output.size
        masks = F.interpolate(
            output.pred_masks.float(),
            size=output.padded or output.size,
            mode="bilinear",
            align_corners=False,
        )
        logits = output.pred_logits.float()
        num = logits.shape[-1] - 1 + output.first_channel
        if self.inference == "simcis":
            return self._simcis_scores(logits, masks, output.first_channel)[..., :height, :width]
        if self.inference in ("comformer", "eclipse"):
            sigmoid = self.inference == "eclipse"
            labels = comformer_inference(logits, masks, sigmoid=sigmoid) - 1 + output.first_channel
            labels = labels.clamp(min=0)  # with a background class, an unpainted pixel is 0 too
            scores = F.one_hot(labels, num).permute(0, 3, 1, 2).float()
        else:
            scores = semantic_inference(logits, masks)
            scores = F.pad(scores, (0, 0, 0, 0, output.first_channel, 0))
        # the padding is scored and then cut off (sem_seg_postprocess, maskformer_model.py:233)
        return scores[..., :height, :width]

    def _simcis_scores(self, logits: torch.Tensor, masks: torch.Tensor, first: int) -> torch.Tensor:
        """``(B, C_t + 1, H, W)`` one-hot of SimCIS's inference
        (:func:`~incseg.simcis_losses.simcis_inference`): a class not seen yet is predicted as
        channel 0, and a pixel no query paints gets the last channel, "no prediction", which
        evaluation leaves out as SimCIS's evaluator leaves out void predictions
        (``continual/evaluator.py:79-82, 114-116``)."""
        seen = self.num_channels - first
        labels = simcis_inference(logits, masks, seen)
        void = labels == logits.shape[-1]
        channels = torch.where(labels < seen, labels + first, 0)
        channels = torch.where(void, self.num_channels, channels)
        return F.one_hot(channels, self.num_channels + 1).permute(0, 3, 1, 2).float()


def _outputs(layer: nn.Module) -> int:
    """The outputs of a classifier: a ``Linear``'s or a :class:`ClassSlice`'s, or an MLP's last
    layer's."""
    if isinstance(layer, (nn.Linear, ClassSlice)):
        return layer.out_features
    return layer.layers[-1].out_features
