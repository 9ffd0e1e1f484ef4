"""ECLIPSE's visual prompts on Mask2Former's decoder (Kim et al., "ECLIPSE: Efficient Continual
Learning in Panoptic Segmentation with Visual Prompt Tuning", CVPR 2024; clovaai/ECLIPSE 9266720,
``mask2former/modeling/transformer_decoder/mask2former_transformer_decoder.py``, cited as
``D:<line>``).

After step 0 each step adds a group of ``P`` prompt queries: a content embedding, a position
embedding per decoder layer ("deep" prompts, ``D:366-377``) and a copy of the mask MLP
(``D:414-419``). The decoder itself is frozen (the method freezes it); it runs

- in training, the current step's prompts alone (``forward_new_train``, ``D:551-630``), with two
  predictions: before the first layer and after the last (the official appends the prediction
  once after its loop, ``D:618-619``, so only the first is an "aux" output);
- in evaluation, the base queries and every step's prompts together (``forward_infer``,
  ``D:633-745``): cross-attention over all, self-attention within each group only (one call per
  group, ``D:706-714``), each group's masks by its own mask MLP, and the logit manipulation of
  :func:`manipulate_logits` on every prediction.

At step 0 (no group yet) the decoder is Mask2Former's.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from incseg.models.mask2former.decoder import (
    DecoderSizes,
    MultiScaleMaskedTransformerDecoder,
    allow_empty_rows,
    attention_mask_from_masks,
)


def _logit(p: Tensor) -> Tensor:
    """``sigmoid_to_logit`` (``D:25-27``): the logit of ``p`` clamped to ``[0.001, 0.999]``."""
    p = p.clamp(0.001, 0.999)
    return torch.log(p / (1 - p))


def expand_deltas(deltas: Sequence[float], groups: int) -> list[float]:
    """One delta per query group (``D:350-360``): none given -> 0 for every group; a longer list
    is cut, a shorter one repeats its last value."""
    values = [float(d) for d in deltas] or [0.0]
    return (values + [values[-1]] * groups)[:groups]


def manipulate_logits(
    logits: Tensor,
    query_groups: Sequence[int],
    class_groups: Sequence[int],
    deltas: Sequence[float],
) -> Tensor:
    """ECLIPSE's logit manipulation (``D:786-817``) on ``(B, Q, K + 1)`` class logits, no-object
    last: for query group ``n`` (``query_groups[n]`` queries, in order) and its own classes
    (``class_groups[n]`` columns, in order), with ``s`` the sum of the sigmoids of every *other*
    class column clamped to ``[0, 1]``:

    - ``delta > 0``: no-object logit = ``logit(delta * s)``;
    - ``delta < 0``: no-object logit = ``logit(|delta| * sigmoid(no-object))``;
    - always: the other classes' logits set to -10.

    Returns a new tensor.
    """
    out = logits.clone()
    total = sum(class_groups)
    start_q, start_c = 0, 0
    for queries, classes, delta in zip(query_groups, class_groups, deltas, strict=True):
        rows = slice(start_q, start_q + queries)
        others = [c for c in range(total) if not start_c <= c < start_c + classes]
        if delta > 0:
            score = logits[:, rows][..., others].sigmoid().sum(2).clamp(0.0, 1.0)
            out[:, rows, -1] = _logit(score * delta)
        elif delta < 0:
            out[:, rows, -1] = _logit(logits[:, rows, -1].sigmoid() * -delta)
        out[:, rows, others] = -10.0
        start_q, start_c = start_q + queries, start_c + classes
    return out


class PromptedDecoder(MultiScaleMaskedTransformerDecoder):
    """Mask2Former's decoder with ECLIPSE's prompt groups (module docstring).

    Args:
        in_channels, num_classes, sizes: as :class:`MultiScaleMaskedTransformerDecoder`.
        num_prompts: ``P``, prompt queries per group (``CONT.NUM_PROMPTS``).

    Attributes:
        class_groups: the class head's columns per step (set by the segmenter), for the logit
            manipulation.
        deltas: the logit manipulation's delta per query group (:func:`expand_deltas`).
    """

    def __init__(
        self, in_channels: int, num_classes: int, sizes: DecoderSizes, num_prompts: int
    ) -> None:
        super().__init__(in_channels, num_classes, sizes)
        self.num_prompts = num_prompts
        self.prompt_feat = nn.ModuleList()
        self.prompt_embed = nn.ModuleList()
        self.prompt_mask_embed = nn.ModuleList()
        self.class_groups: list[int] = []
        self.deltas: list[float] = []

    def add_prompt_group(self) -> None:
        """The next step's prompts, on the device and dtype of the base queries (initialised
        by the method: ``copy_prompt_embed_weights`` and ``copy_mask_embed_weights``)."""
        like = self.query_feat.weight
        hidden = like.shape[1]

        def embedding() -> nn.Embedding:
            return nn.Embedding(self.num_prompts, hidden).to(device=like.device, dtype=like.dtype)

        self.prompt_feat.append(embedding())
        self.prompt_embed.append(nn.ModuleList(embedding() for _ in range(self.num_layers)))
        self.prompt_mask_embed.append(copy.deepcopy(self.mask_embed))

    def forward(
        self,
        x: Sequence[Tensor],
        mask_features: Tensor,
        mask: Tensor | None = None,
        *,
        self_attn_mask: Tensor | None = None,
        return_queries: bool = False,
    ) -> dict:
        if not len(self.prompt_feat):
            return super().forward(
                x,
                mask_features,
                mask,
                self_attn_mask=self_attn_mask,
                return_queries=return_queries,
            )
        if self_attn_mask is not None or return_queries:
            raise ValueError("the prompted decoder takes no self_attn_mask and returns no queries")
        src, pos, sizes = self._flatten_levels(x)
        if self.training:
            return self._forward_new(src, pos, sizes, mask_features)
        return self._forward_groups(src, pos, sizes, mask_features)

    def _heads(
        self,
        output: Tensor,
        mask_mlps: Sequence[nn.Module],
        groups: Sequence[int],
        mask_features: Tensor,
        size,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``forward_prediction_heads`` (``D:770-842``): class logits of all queries (manipulated
        in evaluation), each group's masks by its own MLP, the next attention mask."""
        normed = self.decoder_norm(output).transpose(0, 1)
        logits = self.class_embed(normed)
        parts, start = [], 0
        for mlp, count in zip(mask_mlps, groups, strict=True):
            parts.append(mlp(normed[:, start : start + count]))
            start += count
        embed = torch.cat(parts, dim=1)
        pred_masks = torch.einsum("bqc,bchw->bqhw", embed, mask_features)
        if not self.training:
            deltas = expand_deltas(self.deltas, len(groups))
            logits = manipulate_logits(logits, groups, self.class_groups, deltas)
        attn_mask = attention_mask_from_masks(
            pred_masks, size, self.num_heads, self.mask_activation
        )
        return logits, pred_masks, attn_mask

    def _forward_new(self, src, pos, sizes, mask_features) -> dict:
        """The current step's prompts alone (``D:551-630``): two predictions, before the first
        layer (the one "aux" output) and after the last."""
        feats = [self.prompt_feat[-1].weight]
        embeds = [[e.weight for e in self.prompt_embed[-1]]]
        first, last = self._run(
            feats, embeds, [self.prompt_mask_embed[-1]], src, pos, sizes, mask_features
        )
        aux = [{"pred_logits": first[0], "pred_masks": first[1]}]
        return {"pred_logits": last[0], "pred_masks": last[1], "aux_outputs": aux}

    def _forward_groups(self, src, pos, sizes, mask_features) -> dict:
        """The base queries and every group of prompts (``D:633-745``)."""
        feats = [self.query_feat.weight, *(p.weight for p in self.prompt_feat)]
        base = [self.query_embed.weight] * self.num_layers  # one position embedding for all layers
        embeds = [base, *([e.weight for e in p] for p in self.prompt_embed)]
        mlps = [self.mask_embed, *self.prompt_mask_embed]
        _, last = self._run(feats, embeds, mlps, src, pos, sizes, mask_features)
        return {"pred_logits": last[0], "pred_masks": last[1], "aux_outputs": []}

    def _run(self, feats, embeds, mlps, src, pos, sizes, mask_features):
        """The decoder over query groups (per group its content ``(P_g, C)``, its position
        embedding per layer and its mask MLP): cross-attention over all queries at once (it is
        per query), self-attention inside each group (one call per group, ``D:706-714``).
        Returns the first and the last prediction, each ``(logits, masks, attention mask)``."""
        batch = src[0].shape[1]
        groups = [f.shape[0] for f in feats]
        output = torch.cat(feats).unsqueeze(1).repeat(1, batch, 1)
        first = self._heads(output, mlps, groups, mask_features, sizes[0])
        last, bounds = first, list(itertools.accumulate(groups, initial=0))
        for i in range(self.num_layers):
            query_pos = torch.cat([e[i] for e in embeds]).unsqueeze(1).repeat(1, batch, 1)
            level = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](
                output,
                src[level],
                memory_mask=allow_empty_rows(last[2]),
                memory_key_padding_mask=None,
                pos=pos[level],
                query_pos=query_pos,
            )
            attend = self.transformer_self_attention_layers[i]
            output = torch.cat(
                [
                    attend(
                        output[a:b],
                        tgt_mask=None,
                        tgt_key_padding_mask=None,
                        query_pos=query_pos[a:b],
                    )
                    for a, b in itertools.pairwise(bounds)
                ]
            )
            output = self.transformer_ffn_layers[i](output)
            size = sizes[(i + 1) % self.num_feature_levels]
            last = self._heads(output, mlps, groups, mask_features, size)
        return first, last
