"""Mask2Former's network modules in plain PyTorch (no detectron2, no compiled ops).

Ported from facebookresearch/Mask2Former 9b0651c with the official parameter names, shapes,
initialisation and layer order, so that the official state dicts load (see each module).
"""

from incseg.models.mask2former.backbone import ResNetFeatures, TinyFeatures
from incseg.models.mask2former.decoder import (
    MLP,
    CrossAttentionLayer,
    DecoderSizes,
    FFNLayer,
    MultiScaleMaskedTransformerDecoder,
    SelfAttentionLayer,
    allow_empty_rows,
    attention_mask_from_masks,
)
from incseg.models.mask2former.deform_attn import MSDeformAttn, ms_deform_attn
from incseg.models.mask2former.pixel_decoder import (
    MSDeformAttnPixelDecoder,
    MSDeformAttnTransformerEncoderOnly,
    PixelDecoderSizes,
)
from incseg.models.mask2former.position import PositionEmbeddingSine

__all__ = [
    "MLP",
    "CrossAttentionLayer",
    "DecoderSizes",
    "FFNLayer",
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MultiScaleMaskedTransformerDecoder",
    "PixelDecoderSizes",
    "PositionEmbeddingSine",
    "ResNetFeatures",
    "SelfAttentionLayer",
    "TinyFeatures",
    "allow_empty_rows",
    "attention_mask_from_masks",
    "ms_deform_attn",
]
