"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch, no compiled op.

``ms_deform_attn`` is the math of the reference implementation ``ms_deform_attn_core_pytorch``
(facebookresearch/Mask2Former 9b0651c,
``mask2former/modeling/pixel_decoder/ops/functions/ms_deform_attn_func.py:52-72``), which the
official code falls back to on CPU; ``MSDeformAttn`` follows
``mask2former/modeling/pixel_decoder/ops/modules/ms_deform_attn.py:34-125`` with the same
parameter names, shapes and initialisation, so its state dict loads unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _level_shapes(spatial_shapes: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples of ``value`` at the given locations, per head.

    Args:
        value: (N, S, M, D) float, the flattened levels one after the other, S = sum H_l * W_l,
            M heads of D channels.
        spatial_shapes: L pairs (H_l, W_l), a list or an (L, 2) integer tensor.
        sampling_locations: (N, Lq, M, L, P, 2) float, (x, y) in [0, 1] of the level: (0, 0) is
            the top-left corner of the top-left pixel, so pixel (i, j) has its centre at
            ((j + 0.5) / W_l, (i + 0.5) / H_l). Outside points read zeros.
        attention_weights: (N, Lq, M, L, P) float, the weight of each sample.

    Returns:
        (N, Lq, M * D), head-major channels (head m is ``[..., m * D:(m + 1) * D]``).

    Sampling is ``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``
    level by level, and the products are summed over levels and points in the official order
    (ms_deform_attn_func.py:55-72).
    """
    n, s, heads, dim = value.shape
    _, n_queries, _, levels, points, _ = sampling_locations.shape
    shapes = _level_shapes(spatial_shapes)
    if len(shapes) != levels or sum(h * w for h, w in shapes) != s:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes {shapes} do not match value of length {s} "
            f"and {levels} sampled levels"
        )
    per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample reads coordinates in [-1, 1].
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (h, w) in enumerate(shapes):
        # One image per (batch, head): (N, HW, M, D) -> (N*M, D, H, W).
        image = per_level[level].flatten(2).transpose(1, 2).reshape(n * heads, dim, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2), batch-major like the images.
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(
            F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P), broadcast over the D channels of the samples.
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, n_queries, levels * points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(n, heads * dim, n_queries).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query reads ``n_points`` points per level and head.

    Parameters (ms_deform_attn.py:59-62), with C = ``d_model``, M heads, L levels, P points:
    ``sampling_offsets`` Linear(C, M*L*P*2), ``attention_weights`` Linear(C, M*L*P),
    ``value_proj`` Linear(C, C), ``output_proj`` Linear(C, C). ``_reset_parameters`` is the
    official initialisation (ms_deform_attn.py:66-80): offsets start on a ring of M directions,
    point p at distance p + 1 pixels, and the attention is uniform.

    The official module warns when C / M is not a power of two, for its CUDA kernel only; there
    is no kernel here, so no warning. Box reference points (last dim 4) are not supported.
    """

    def __init__(
        self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"MSDeformAttn: d_model {d_model} is not divisible by n_heads {n_heads}"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official init (ms_deform_attn.py:66-80); the xavier calls draw in the official order."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        ring = torch.stack([angles.cos(), angles.sin()], -1)
        # Scale each direction so that its larger coordinate is +-1 (a square, not a circle).
        ring = ring / ring.abs().max(-1, keepdim=True)[0]
        grid = ring.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        for point in range(self.n_points):
            grid[:, :, point, :] *= point + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from each query to points around its reference point (ms_deform_attn.py:82-125).

        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) float, (x, y) in [0, 1] per level, padding included.
            input_flatten: (N, S, C), the L levels flattened and concatenated, S = sum H_l W_l.
            input_spatial_shapes: (L, 2) long, (H_l, W_l).
            input_level_start_index: (L,) long, where each level starts in S; kept for the
                official signature (only the compiled kernel read it).
            input_padding_mask: optional (N, S) bool, True where the input is padding.

        Returns:
            (N, Lq, C).
        """
        n, n_queries, _ = query.shape
        _, n_in, _ = input_flatten.shape
        if int((input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum()) != n_in:
            raise ValueError(
                f"MSDeformAttn: input_spatial_shapes cover "
                f"{int((input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum())} "
                f"positions but input_flatten has {n_in}"
            )
        if reference_points.shape[-1] != 2:
            raise ValueError(
                "MSDeformAttn: reference_points must end in 2 (x, y) coordinates; got last "
                f"dim {reference_points.shape[-1]} (boxes, last dim 4, are not supported)"
            )
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, n_in, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(
            n, n_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            n, n_queries, self.n_heads, self.n_levels * self.n_points
        )
        # One softmax over all levels and points of a head.
        weights = F.softmax(weights, -1).view(
            n, n_queries, self.n_heads, self.n_levels, self.n_points
        )
        # Offsets are in pixels of each level: divide by (W_l, H_l) to get [0, 1] units.
        normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / normalizer[None, None, None, :, None, :]
        )
        out = ms_deform_attn(value, input_spatial_shapes, locations, weights)
        return self.output_proj(out)
