"""Sine position embedding of Mask2Former (DETR's, normalised to ``[0, 2*pi]``).

Follows facebookresearch/Mask2Former 9b0651c,
``mask2former/modeling/transformer_decoder/position_encoding.py:12-52``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine/cosine embedding of the pixel coordinates of a feature map.

    ``forward(x, mask=None)`` reads only the shape and device of ``x`` (B, C, H, W) and returns a
    float32 tensor (B, 2 * num_pos_feats, H, W): the first ``num_pos_feats`` channels encode the
    row, the next ``num_pos_feats`` the column, each as interleaved ``sin``/``cos`` pairs
    (position_encoding.py:29-52). ``mask`` (B, H, W) bool marks padded pixels (True), which do
    not count in the cumulative coordinates. With ``normalize`` the coordinates are divided by
    their last value (+1e-6) and scaled by ``scale`` (default 2*pi).
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000,
        normalize: bool = False,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: a scale needs normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), dtype=torch.bool, device=x.device)
        kept = ~mask
        rows = kept.cumsum(1, dtype=torch.float32)
        cols = kept.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            rows = rows / (rows[:, -1:, :] + eps) * self.scale
            cols = cols / (cols[:, :, -1:] + eps) * self.scale
        # Channel pairs (2k, 2k+1) share the frequency temperature^(2k / num_pos_feats).
        index = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        freq = self.temperature ** (
            2 * torch.div(index, 2, rounding_mode="floor") / self.num_pos_feats
        )
        return torch.cat(
            (_sin_cos(rows[..., None] / freq), _sin_cos(cols[..., None] / freq)), dim=3
        ).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale}"
        )


def _sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """(..., F) angles -> (..., F): sin of the even channels interleaved with cos of the odd ones."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
