"""Mask2Former's masked-attention transformer decoder in plain PyTorch (no detectron2).

Follows facebookresearch/Mask2Former 9b0651c,
``mask2former/modeling/transformer_decoder/mask2former_transformer_decoder.py`` (cited below as
``m2f_decoder.py``): same submodule and parameter names, shapes, initialisation, construction
order (so a given seed draws the same weights) and layer order, so the official state dict
(``sem_seg_head.predictor.*`` of a checkpoint, prefix removed) loads unchanged.

Additions for incremental learning, all off by default: a replaceable ``class_embed``,
``add_queries``, ``self_attn_mask``, ``return_queries`` and ``mask_activation`` (see
:class:`MultiScaleMaskedTransformerDecoder`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from incseg.models.mask2former.position import PositionEmbeddingSine

Tensor = torch.Tensor

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
MASK_ACTIVATIONS = ("sigmoid", "softmax")


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function called ``name`` (m2f_decoder.py:181-189)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def c2_xavier_fill(module: nn.Module) -> None:
    """fvcore's ``c2_xavier_fill`` (Caffe2 XavierFill): kaiming-uniform(a=1) weight, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def _xavier_matrices(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def _add_pos(tensor: Tensor, pos: Tensor | None) -> Tensor:
    return tensor if pos is None else tensor + pos


class SelfAttentionLayer(nn.Module):
    """Self-attention among the queries + residual + LayerNorm (m2f_decoder.py:17-72).

    Tensors are sequence-first: ``tgt`` and ``query_pos`` (Q, B, C). Post-norm by default
    (``norm(tgt + attn(tgt))``); ``normalize_before`` gives ``tgt + attn(norm(tgt))``. The query
    position embedding is added to queries and keys, not to values. ``tgt_mask`` is a bool
    (Q, Q) or (B*heads, Q, Q) mask, True = not allowed.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dropout: float = 0.0,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        # Unused by the layer; kept because the official layer carries it (no parameters).
        self.activation = activation_fn(activation)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(
        self,
        tgt: Tensor,
        tgt_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = _add_pos(x, query_pos)
        attended = self.self_attn(
            q, k, value=x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask
        )[0]
        tgt = tgt + self.dropout(attended)
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Queries attend to one level of pixel features + residual + LayerNorm (m2f_decoder.py:75-135).

    ``tgt``/``query_pos`` (Q, B, C), ``memory``/``pos`` (HW, B, C), sequence-first. ``memory_mask``
    is the bool (B*heads, Q, HW) masked-attention mask, True = not allowed. Post-norm by default,
    pre-norm with ``normalize_before``. The pixel position embedding is added to the keys only.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dropout: float = 0.0,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = activation_fn(activation)  # unused, as in the official layer
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        attended = self.multihead_attn(
            query=_add_pos(x, query_pos),
            key=_add_pos(memory, pos),
            value=memory,
            attn_mask=memory_mask,
            key_padding_mask=memory_key_padding_mask,
        )[0]
        tgt = tgt + self.dropout(attended)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """Two-layer feed-forward block + residual + LayerNorm (m2f_decoder.py:138-178)."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.activation = activation_fn(activation)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, tgt: Tensor) -> Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        tgt = tgt + self.dropout(x)
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them, none after the last (m2f_decoder.py:192-204)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        ins = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(ins, outs))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < self.num_layers - 1:
                x = F.relu(x)
        return x


def attention_mask_from_masks(
    pred_masks: Tensor, target_size: Sequence[int], num_heads: int, activation: str = "sigmoid"
) -> Tensor:
    """The masked-attention mask of the next cross-attention, from the predicted masks.

    ``pred_masks`` (B, Q, H, W) logits are resized bilinearly (align_corners=False) to
    ``target_size`` (h, w), turned into probabilities (``"sigmoid"``, official, per query;
    ``"softmax"`` over the query dimension, as CoMFormer), and a pixel is forbidden (True) where
    the probability is below 0.5. The mask is repeated per head, batch-major as
    ``nn.MultiheadAttention`` wants it: bool (B * num_heads, Q, h * w), detached
    (m2f_decoder.py:440-446). The empty-row rule is :func:`allow_empty_rows`.
    """
    if activation not in MASK_ACTIVATIONS:
        raise ValueError(
            f"unknown mask activation {activation!r}; expected one of {MASK_ACTIVATIONS}"
        )
    resized = F.interpolate(pred_masks, size=target_size, mode="bilinear", align_corners=False)
    probs = resized.sigmoid() if activation == "sigmoid" else resized.softmax(dim=1)
    forbidden = probs.flatten(2).unsqueeze(1).repeat(1, num_heads, 1, 1).flatten(0, 1) < 0.5
    return forbidden.detach()


def allow_empty_rows(attn_mask: Tensor) -> Tensor:
    """Let a query that may attend nowhere attend everywhere (m2f_decoder.py:398).

    A row of ``attn_mask`` (..., Q, HW) that is all True would make the softmax NaN; the
    official decoder sets such a row to all False before each cross-attention.
    """
    return attn_mask & ~attn_mask.all(-1, keepdim=True)


@dataclass(frozen=True)
class DecoderSizes:
    """The sizes and options of :class:`MultiScaleMaskedTransformerDecoder`.

    Defaults are the ADE20K semantic-segmentation R50 config
    (``configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml:26-35``); the official
    decoder reads its keys in ``from_config`` (m2f_decoder.py:337-359).
    """

    hidden_dim: int = 256
    """Width of the queries and of every layer (MODEL.MASK_FORMER.HIDDEN_DIM)."""
    num_queries: int = 100
    """Number of base learnable queries (MODEL.MASK_FORMER.NUM_OBJECT_QUERIES)."""
    nheads: int = 8
    """Heads of every self- and cross-attention (MODEL.MASK_FORMER.NHEADS)."""
    dim_feedforward: int = 2048
    """Hidden width of every FFN (MODEL.MASK_FORMER.DIM_FEEDFORWARD)."""
    dec_layers: int = 9
    """Number of layers built: MODEL.MASK_FORMER.DEC_LAYERS minus one (m2f_decoder.py:355;
    ADE20K R50 uses DEC_LAYERS 10, so 9 here)."""
    pre_norm: bool = False
    """Pre-norm layers instead of post-norm (MODEL.MASK_FORMER.PRE_NORM)."""
    mask_dim: int = 256
    """Channels of the pixel decoder's ``mask_features``, the output of ``mask_embed``
    (MODEL.SEM_SEG_HEAD.MASK_DIM)."""
    enforce_input_project: bool = False
    """Project the inputs with a 1x1 conv even when ``in_channels == hidden_dim``
    (MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ)."""
    mask_activation: str = "sigmoid"
    """How the predicted masks become the attention mask: ``"sigmoid"`` (official, no config key)
    or ``"softmax"`` over the queries (CoMFormer), see :func:`attention_mask_from_masks`."""


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Mask2Former's transformer decoder: masked cross-attention over 3 pixel-decoder scales.

    Follows m2f_decoder.py:207-461. ``dec_layers`` is the number of layers built (the official
    config's DEC_LAYERS minus one: ADE20K R50 uses DEC_LAYERS 10, so 9 here). Each layer is
    cross-attention (masked by the previous prediction), self-attention, FFN; level
    ``i % 3`` of the inputs feeds layer ``i``. A prediction is made from the learnable queries
    before the first layer and after every layer, so there are ``dec_layers + 1`` predictions;
    the last is the output and the others are ``aux_outputs``.

    Built as ``MultiScaleMaskedTransformerDecoder(in_channels, num_classes, sizes)``: the
    channels of the input maps, the classes (the default ``class_embed`` predicts
    ``num_classes + 1``) and a :class:`DecoderSizes`, whose defaults are the ADE20K
    semantic-segmentation R50 config
    (``configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml:26-35``).

    Hooks for incremental learning (all default off; off, they cost nothing):

    * ``class_embed``: any module mapping the normalised queries (B, Q, hidden_dim) to
      (B, Q, K + 1) logits; it may be replaced, the decoder only calls it. The default is the
      official ``nn.Linear(hidden_dim, num_classes + 1)``.
    * :meth:`add_queries`: appends learnable queries (feature + position embedding) after the
      ``num_queries`` base ones; every forward uses all of them. Stored as ``nn.Embedding`` in
      ``extra_query_feat`` / ``extra_query_embed`` (keys ``extra_query_feat.<i>.weight``).
    * ``forward(..., self_attn_mask=...)``: a bool (Q, Q) mask, True = not allowed, passed to
      every self-attention layer (e.g. to keep groups of queries apart). Each row must allow at
      least one query (usually the query itself), or that query's output is NaN; this is not
      checked, to keep the forward free of device synchronisation.
    * ``forward(..., return_queries=True)``: adds ``"queries"``, the query states each
      prediction is made from, before ``decoder_norm`` (B, Q, hidden_dim): the learnable
      ``query_feat`` first, then each layer's output after its FFN, in the order of the
      predictions (aux first); BalConpas's ``med_tokens``
      (jinpeng0528/BalConpas ``mask2former_transformer_decoder.py:404-456``).
    * ``sizes.mask_activation``: how the predicted masks become the attention mask: ``"sigmoid"``
      (official) or ``"softmax"`` over the queries (CoMFormer), see
      :func:`attention_mask_from_masks`.
    """

    _version = 2

    def __init__(
        self, in_channels: int, num_classes: int, sizes: DecoderSizes = DecoderSizes()
    ) -> None:
        super().__init__()
        if sizes.mask_activation not in MASK_ACTIVATIONS:
            raise ValueError(
                f"unknown mask_activation {sizes.mask_activation!r}; "
                f"expected one of {MASK_ACTIVATIONS}"
            )
        hidden_dim = sizes.hidden_dim
        self.mask_classification = True
        self.mask_activation = sizes.mask_activation
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = sizes.nheads
        self.num_layers = sizes.dec_layers
        self._build_layers(sizes)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = sizes.num_queries
        self.query_feat = nn.Embedding(sizes.num_queries, hidden_dim)
        self.query_embed = nn.Embedding(sizes.num_queries, hidden_dim)
        self.num_feature_levels = 3
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self._build_input_proj(in_channels, hidden_dim, sizes.enforce_input_project)
        self.class_embed: nn.Module = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, sizes.mask_dim, 3)
        # Registered last and empty: the official parameters and their draws come first.
        self.extra_query_feat = nn.ModuleList()
        self.extra_query_embed = nn.ModuleList()

    def _build_layers(self, sizes: DecoderSizes) -> None:
        """The ``dec_layers`` self-attention, cross-attention and FFN layers."""
        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        d_model, nheads, pre_norm = sizes.hidden_dim, sizes.nheads, sizes.pre_norm
        # Built interleaved, layer by layer, as the official loop (m2f_decoder.py:284-310), so
        # that a seed draws the same weights.
        for _ in range(sizes.dec_layers):
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(d_model, nheads, dropout=0.0, normalize_before=pre_norm)
            )
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(d_model, nheads, dropout=0.0, normalize_before=pre_norm)
            )
            self.transformer_ffn_layers.append(
                FFNLayer(d_model, sizes.dim_feedforward, dropout=0.0, normalize_before=pre_norm)
            )

    def _build_input_proj(self, in_channels: int, hidden_dim: int, enforce: bool) -> None:
        """Per level a 1x1 conv to ``hidden_dim`` (c2_xavier_fill), or an empty ``Sequential``
        when the channels already match and no projection is enforced."""
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce:
                self.input_proj.append(nn.Conv2d(in_channels, hidden_dim, kernel_size=1))
                c2_xavier_fill(self.input_proj[-1])
            else:
                self.input_proj.append(nn.Sequential())

    @property
    def total_queries(self) -> int:
        """``num_queries`` plus the queries added by :meth:`add_queries`."""
        return self.num_queries + sum(e.num_embeddings for e in self.extra_query_feat)

    def add_queries(self, n: int) -> range:
        """Append ``n`` learnable queries; returns their indices among all queries.

        They are initialised as the base ones (``nn.Embedding``: standard normal) on the device
        and dtype of ``query_feat``. An optimizer built before the call does not see them.
        """
        if n < 1:
            raise ValueError(f"add_queries: n must be at least 1, got {n}")
        start = self.total_queries
        like = self.query_feat.weight
        hidden = like.shape[1]
        for extra in (self.extra_query_feat, self.extra_query_embed):
            extra.append(nn.Embedding(n, hidden).to(device=like.device, dtype=like.dtype))
        return range(start, start + n)

    def _query_weights(self) -> tuple[Tensor, Tensor]:
        """(Q_total, C) query features and query position embeddings."""
        feat, embed = self.query_feat.weight, self.query_embed.weight
        if len(self.extra_query_feat):
            feat = torch.cat([feat, *(e.weight for e in self.extra_query_feat)])
            embed = torch.cat([embed, *(e.weight for e in self.extra_query_embed)])
        return feat, embed

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Checkpoints older than version 2 call the query features "static_query"
        # (m2f_decoder.py:212-233).
        version = local_metadata.get("version")
        if version is None or version < 2:
            for key in [k for k in state_dict if k.startswith(prefix) and "static_query" in k]:
                state_dict[key.replace("static_query", "query_feat")] = state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _flatten_levels(
        self, x: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[torch.Size]]:
        """Per level: projected features + level embedding and the position embedding, both
        (HW, B, hidden_dim), and the level's (H, W) (m2f_decoder.py:373-380)."""
        src, pos, sizes = [], [], []
        for i in range(self.num_feature_levels):
            sizes.append(x[i].shape[-2:])
            pos.append(self.pe_layer(x[i], None).flatten(2).permute(2, 0, 1))
            projected = self.input_proj[i](x[i]).flatten(2)
            src.append((projected + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        return src, pos, sizes

    def _check_self_attn_mask(self, self_attn_mask: Tensor | None, n_queries: int) -> None:
        if self_attn_mask is None:
            return
        if self_attn_mask.dtype != torch.bool or tuple(self_attn_mask.shape) != (n_queries,) * 2:
            raise ValueError(
                f"self_attn_mask must be a bool ({n_queries}, {n_queries}) tensor (True = not "
                f"allowed); got {self_attn_mask.dtype} {tuple(self_attn_mask.shape)}"
            )

    def forward(
        self,
        x: Sequence[Tensor],
        mask_features: Tensor,
        mask: Tensor | None = None,
        *,
        self_attn_mask: Tensor | None = None,
        return_queries: bool = False,
    ) -> dict:
        """Decode the queries into class logits and mask logits (m2f_decoder.py:363-431).

        Args:
            x: 3 feature maps (B, in_channels, H_i, W_i), low to high resolution (the pixel
                decoder's ``multi_scale_features``).
            mask_features: (B, mask_dim, H/4, W/4), the per-pixel embeddings.
            mask: ignored, as in the official decoder (it "does not affect performance").
            self_attn_mask: optional bool (Q, Q), True = query i may not attend to query j.
            return_queries: also return the query states (before ``decoder_norm``) of every
                prediction.

        Returns:
            ``{"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4), "aux_outputs":
            [{"pred_logits", "pred_masks"}] * dec_layers}`` (+ ``"queries"``:
            ``dec_layers + 1`` tensors (B, Q, hidden_dim)), Q = :attr:`total_queries`.
        """
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature maps, got {len(x)}")
        del mask
        src, pos, sizes = self._flatten_levels(x)
        batch = src[0].shape[1]
        feat, embed = self._query_weights()
        self._check_self_attn_mask(self_attn_mask, feat.shape[0])
        query_embed = embed.unsqueeze(1).repeat(1, batch, 1)
        output = feat.unsqueeze(1).repeat(1, batch, 1)

        classes, masks, queries = [], [], []
        # The learnable queries are supervised too: one prediction before the first layer.
        logits, pred_masks, attn_mask = self.forward_prediction_heads(
            output, mask_features, sizes[0]
        )
        for i in range(self.num_layers + 1):
            classes.append(logits)
            masks.append(pred_masks)
            if return_queries:
                queries.append(output.transpose(0, 1))
            if i == self.num_layers:
                break
            level = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](
                output,
                src[level],
                memory_mask=allow_empty_rows(attn_mask),
                memory_key_padding_mask=None,  # padding is not masked, as in the official code
                pos=pos[level],
                query_pos=query_embed,
            )
            output = self.transformer_self_attention_layers[i](
                output, tgt_mask=self_attn_mask, tgt_key_padding_mask=None, query_pos=query_embed
            )
            output = self.transformer_ffn_layers[i](output)
            logits, pred_masks, attn_mask = self.forward_prediction_heads(
                output, mask_features, sizes[(i + 1) % self.num_feature_levels]
            )
        out = {
            "pred_logits": classes[-1],
            "pred_masks": masks[-1],
            "aux_outputs": self._set_aux_loss(classes, masks),
        }
        if return_queries:
            out["queries"] = queries
        return out

    def forward_prediction_heads(
        self, output: Tensor, mask_features: Tensor, attn_mask_target_size: Sequence[int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Class logits, mask logits and next attention mask from the queries (m2f_decoder.py:433-448).

        ``output`` (Q, B, C) -> (B, Q, K+1) logits, (B, Q, H/4, W/4) masks (dot products of the
        mask embeddings with ``mask_features``) and the bool (B*heads, Q, h*w) attention mask at
        ``attn_mask_target_size`` (without the empty-row rule), as the official.
        """
        normed = self.decoder_norm(output).transpose(0, 1)
        logits = self.class_embed(normed)
        mask_embed = self.mask_embed(normed)
        pred_masks = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        attn_mask = attention_mask_from_masks(
            pred_masks, attn_mask_target_size, self.num_heads, self.mask_activation
        )
        return logits, pred_masks, attn_mask

    def _set_aux_loss(self, classes: list[Tensor], masks: list[Tensor]) -> list[dict]:
        """Every prediction but the last (m2f_decoder.py:450-461)."""
        return [{"pred_logits": c, "pred_masks": m} for c, m in zip(classes[:-1], masks[:-1])]
