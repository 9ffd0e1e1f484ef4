"""SimCIS's decoder: queries selected from the pixel decoder's tokens, in plain PyTorch.

SimCIS (Zhu et al., "SimCIS: Simple Class-Incremental Semantic Segmentation with Strong
Baseline", CVPR 2025; SooLab/SimCIS 28bc91e) replaces Mask2Former's learnable queries with the
encoder tokens the class head scores highest (MaskDINO-style query selection) and adds, per
query, a reference box refined at every layer. Cited below as ``simcis_decoder.py``:
``mask2former/modeling/transformer_decoder/mask2former_transformer_decoder.py`` of that
repository, and ``simcis_utils.py``: ``.../transformer_decoder/utils/utils.py``.

What it does, in order (``simcis_decoder.py:493-660``):

1. The three levels are projected and given their level embedding as in Mask2Former; their
   tokens are concatenated, coarsest level first: ``(B, S, hidden)``.
2. :func:`encoder_proposals`: a reference box per token (its cell centre, side
   ``0.05 * 2**level``, in logit space; ``inf`` outside (0.01, 0.99)); tokens of such boxes are
   zeroed. ``encoder_norm(enc_output(tokens))`` are the candidates; the class head scores them
   (through ``decoder_norm``) and ``_bbox_embed`` refines their boxes.
3. The ``num_queries`` candidates of highest maximal class logit are the queries; their
   prediction (the *intermediate* one, ``interm``) is made from them with gradient, and the
   decoder starts from them detached.
4. Every layer: the query position is ``query_scale(output) * ref_point_head(sine(box))``;
   self-attention, then masked cross-attention (the reverse of Mask2Former's order), then the FFN;
   predictions through ``decoder_norm`` as Mask2Former's, and a box refined by ``bbox_embed``
   (one MLP shared by all layers), detached for the next layer.

Two inputs a training step may pass (:class:`SelectionInputs`): stored query features of old
classes appended as *virtual* queries, which skip self- and cross-attention and only go through
the FFNs and heads (``simcis_decoder.py:518-531, 571-572, 752-768``), and the old model's
selected positions, from which a second, distillation pass runs (``:566-568, 587-592, 614-629``).

The class head is whatever ``class_embed`` is (SimCIS's: one ``Linear`` over every class of the
setting, no no-object row, :class:`incseg.models.mask2former.segmenter.StaticClassHead`).
Differences from the official module: the sine embedding of a box uses ``hidden_dim // 2``
frequencies per coordinate where the official hard-codes 128 (equal at its 256), so that smaller
decoders build; the official pads the intermediate boxes with zero rows for virtual queries at
every step > 0 (also without them) and here only when virtual queries are present (their boxes
enter no loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from incseg.models.mask2former.decoder import (
    MLP,
    DecoderSizes,
    MultiScaleMaskedTransformerDecoder,
    allow_empty_rows,
)
from incseg.models.mask2former.position import PositionEmbeddingSine

Tensor = torch.Tensor


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to [0, 1] and both parts to at least ``eps``
    (``simcis_utils.py:26-30``)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def encoder_proposals(memory: Tensor, sizes: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Each token's reference box and the tokens of invalid boxes zeroed
    (``gen_encoder_output_proposals_p``, ``simcis_utils.py:33-70``, without padding masks).

    Args:
        memory: ``(B, S, C)`` tokens of the levels in ``sizes`` order, each level row-major.
        sizes: ``(H, W)`` per level.

    Returns:
        ``(B, S, C)`` tokens (zero where the box is invalid) and ``(B, S, 4)`` boxes
        ``(cx, cy, w, h)`` in logit space: cell centre ``((x + 0.5) / W, (y + 0.5) / H)``, side
        ``0.05 * 2**level``; ``inf`` where a coordinate is outside (0.01, 0.99).
    """
    batch = memory.shape[0]
    proposals = []
    for level, (height, width) in enumerate(sizes):
        ys = torch.linspace(0, height - 1, height, dtype=torch.float32, device=memory.device)
        xs = torch.linspace(0, width - 1, width, dtype=torch.float32, device=memory.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([grid_x, grid_y], -1)
        scale = torch.tensor([width, height], dtype=torch.float32, device=memory.device)
        grid = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0**level)
        proposals.append(torch.cat([grid, wh], -1).view(batch, -1, 4))
    boxes = torch.cat(proposals, 1)
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)
    boxes = torch.log(boxes / (1 - boxes)).masked_fill(~valid, float("inf"))
    return memory.masked_fill(~valid, 0.0), boxes


def box_sine_embedding(boxes: Tensor, frequencies: int) -> Tensor:
    """``(Q, B, 4)`` boxes ``(cx, cy, w, h)`` in [0, 1] -> ``(Q, B, 4 * frequencies)``: per
    coordinate, sines and cosines of ``2 pi x / 10000 ** (2 floor(i / 2) / frequencies)``
    interleaved, in the order y, x, w, h (``_gen_sineembed_for_position``,
    ``simcis_decoder.py:687-713``; ``frequencies`` is 128 there)."""
    dim_t = torch.arange(frequencies, dtype=torch.float32, device=boxes.device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="trunc") / frequencies)

    def embed(coordinate: Tensor) -> Tensor:
        angles = coordinate[:, :, None] * (2 * math.pi) / dim_t
        return torch.stack((angles[:, :, 0::2].sin(), angles[:, :, 1::2].cos()), 3).flatten(2)

    x, y, w, h = (embed(boxes[:, :, k]) for k in range(4))
    return torch.cat((y, x, w, h), dim=2)


@dataclass(frozen=True)
class SelectionInputs:
    """What a training step passes to :class:`SelectionDecoder` besides the maps.

    Attributes:
        virtual: ``(B, V, hidden)`` stored query features appended as virtual queries, or None.
        distill_positions: ``(B, K)`` int64 token positions the old model selected (its
            ``topk``), for the distillation pass, or None.
    """

    virtual: Tensor | None = None
    distill_positions: Tensor | None = None


class SelectionDecoder(MultiScaleMaskedTransformerDecoder):
    """SimCIS's decoder (module docstring), built as
    ``SelectionDecoder(in_channels, num_classes, sizes)`` like Mask2Former's; ``num_queries`` is
    the number of tokens selected. Submodules in the official construction order
    (``simcis_decoder.py:259-430``): the layers, ``decoder_norm``, ``level_embed``,
    ``input_proj``, ``class_embed``, ``mask_embed``, ``ref_point_head``, ``enc_output``,
    ``encoder_norm``, ``query_scale``, ``_bbox_embed`` (last layer zero) shared as ``bbox_embed``.
    No learnable queries.
    """

    def __init__(
        self, in_channels: int, num_classes: int, sizes: DecoderSizes | None = None
    ) -> None:
        nn.Module.__init__(self)
        sizes = sizes or DecoderSizes()
        hidden = sizes.hidden_dim
        self.mask_classification = True
        self.mask_activation = sizes.mask_activation
        self.pe_layer = PositionEmbeddingSine(hidden // 2, normalize=True)
        self.num_heads = sizes.nheads
        self.num_layers = sizes.dec_layers
        self._build_layers(sizes)
        self.decoder_norm = nn.LayerNorm(hidden)
        self.num_queries = sizes.num_queries
        self.num_feature_levels = 3
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden)
        self._build_input_proj(in_channels, hidden, sizes.enforce_input_project)
        self.class_embed: nn.Module = nn.Linear(hidden, num_classes)
        self.mask_embed = MLP(hidden, hidden, sizes.mask_dim, 3)
        self.ref_point_head = MLP(2 * hidden, hidden, hidden, 2)
        self.enc_output = nn.Linear(hidden, hidden)
        self.encoder_norm = nn.LayerNorm(hidden)
        self.query_scale = MLP(hidden, hidden, hidden, 2)
        self._bbox_embed = MLP(hidden, hidden, 4, 3)
        nn.init.constant_(self._bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(self._bbox_embed.layers[-1].bias, 0)
        self.bbox_embed = nn.ModuleList([self._bbox_embed] * self.num_layers)

    @property
    def total_queries(self) -> int:
        return self.num_queries

    def add_queries(self, n: int) -> range:
        raise NotImplementedError("SimCIS's decoder selects its queries; it has none to add")

    def forward(  # type: ignore[override]
        self,
        x: Sequence[Tensor],
        mask_features: Tensor,
        mask: Tensor | None = None,
        *,
        inputs: SelectionInputs | None = None,
    ) -> dict:
        """Select, decode and predict (``simcis_decoder.py:493-660``).

        Returns:
            ``pred_logits`` (B, Q, C), ``pred_masks`` (B, Q, H/4, W/4), ``pred_boxes`` (B, Q, 4)
            of the last layer, Q = ``num_queries`` plus the virtual queries; ``aux_outputs``
            (the other layers' three); ``interm`` (the selected tokens' prediction, boxes
            padded with zero rows for the virtual queries); ``topk`` (B, num_queries) the
            selected positions; ``selected`` (B, Q, hidden) the selected tokens (with the
            virtual queries); with ``inputs.distill_positions`` also ``distill``:
            ``{"pred_logits", "interm_logits"}`` of the distillation pass.
        """
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature maps, got {len(x)}")
        del mask
        inputs = inputs or SelectionInputs()
        src, pos, sizes = self._flatten_levels(x)
        tokens, proposals = encoder_proposals(torch.cat(src, 0).transpose(0, 1), sizes)
        tokens = self.encoder_norm(self.enc_output(tokens))
        coords = self._bbox_embed(tokens) + proposals
        scores = self.class_embed(self.decoder_norm(tokens))
        topk = torch.topk(scores.max(-1)[0], self.num_queries, dim=1)[1]
        selected = _gather(tokens, topk)
        virtual = inputs.virtual
        if virtual is not None:
            selected = torch.cat([selected, virtual.to(selected)], 1)
        boxes = _gather(coords, topk)
        logits, masks, attn_mask = self.forward_prediction_heads(
            selected.transpose(0, 1), mask_features, sizes[0]
        )
        refpoints = boxes.sigmoid().transpose(0, 1).detach()
        interm_boxes = boxes.sigmoid()
        if virtual is not None:
            refpoints = nn.functional.pad(refpoints, (0, 0, 0, 0, 0, virtual.shape[1]))
            interm_boxes = nn.functional.pad(interm_boxes, (0, 0, 0, virtual.shape[1]))
        layers = self._decode(
            selected.transpose(0, 1).detach(),
            mask_features,
            refpoints,
            (src, pos, sizes),
            attn_mask,
            virtual.shape[1] if virtual is not None else 0,
        )
        out = _outputs(layers)
        out["interm"] = {"pred_logits": logits, "pred_masks": masks, "pred_boxes": interm_boxes}
        out["topk"], out["selected"] = topk, selected
        if inputs.distill_positions is not None:
            out["distill"] = self._distill(
                tokens, coords, topk, inputs.distill_positions, mask_features, (src, pos, sizes)
            )
        return out

    def _distill(
        self,
        tokens: Tensor,
        coords: Tensor,
        topk: Tensor,
        positions: Tensor,
        mask_features: Tensor,
        levels: tuple,
    ) -> dict[str, Tensor]:
        """The distillation pass: the tokens at the old model's positions, predicted from (the
        intermediate logits) and decoded (the last layer's logits). Its first boxes are those
        of this model's own selection, as the official gathers them with ``topk_proposals``
        (``simcis_decoder.py:587-592``)."""
        chosen = _gather(tokens, positions)
        logits, _, attn_mask = self.forward_prediction_heads(
            chosen.transpose(0, 1), mask_features, levels[2][0]
        )
        refpoints = _gather(coords, topk).sigmoid().transpose(0, 1).detach()
        layers = self._decode(
            chosen.transpose(0, 1).detach(), mask_features, refpoints, levels, attn_mask, 0
        )
        return {"pred_logits": layers[-1][0], "interm_logits": logits}

    def _decode(
        self,
        output: Tensor,
        mask_features: Tensor,
        refpoints: Tensor,
        levels: tuple,
        attn_mask: Tensor,
        num_virtual: int,
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The layers (``forward_decoder``, ``simcis_decoder.py:739-796``): per layer the
        (logits, masks, boxes) after it. ``output`` (Q, B, C) and ``refpoints`` (Q, B, 4) in
        [0, 1]; the last ``num_virtual`` queries skip the attentions."""
        src, pos, sizes = levels
        real = output.shape[0] - num_virtual
        predictions = []
        for i in range(self.num_layers):
            sine = box_sine_embedding(refpoints, output.shape[-1] // 2)
            query_pos = self.query_scale(output) * self.ref_point_head(sine)
            level = i % self.num_feature_levels
            attn_mask = allow_empty_rows(attn_mask)
            attended = self.transformer_self_attention_layers[i](
                output[:real], tgt_mask=None, tgt_key_padding_mask=None, query_pos=query_pos[:real]
            )
            attended = self.transformer_cross_attention_layers[i](
                attended,
                src[level],
                memory_mask=attn_mask[:, :real],
                memory_key_padding_mask=None,
                pos=pos[level],
                query_pos=query_pos[:real],
            )
            output = self.transformer_ffn_layers[i](torch.cat([attended, output[real:]], 0))
            logits, masks, attn_mask = self.forward_prediction_heads(
                output, mask_features, sizes[(i + 1) % self.num_feature_levels]
            )
            boxes = (self.bbox_embed[i](output) + inverse_sigmoid(refpoints)).sigmoid()
            refpoints = boxes.detach()
            predictions.append((logits, masks, boxes.transpose(0, 1)))
        return predictions


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """``values`` (B, S, D) at ``index`` (B, K) -> (B, K, D)."""
    return torch.gather(values, 1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


def _outputs(layers: list[tuple[Tensor, Tensor, Tensor]]) -> dict:
    keys = ("pred_logits", "pred_masks", "pred_boxes")
    out = dict(zip(keys, layers[-1], strict=True))
    out["aux_outputs"] = [dict(zip(keys, layer, strict=True)) for layer in layers[:-1]]
    return out
