"""Mask2Former's multi-scale deformable-attention pixel decoder in plain PyTorch.

Follows facebookresearch/Mask2Former 9b0651c, ``mask2former/modeling/pixel_decoder/msdeformattn.py``
(cited as ``msdeformattn.py``): same submodule and parameter names, shapes, initialisation,
construction order (a given seed draws the same weights) and computation, so the official state
dict (``sem_seg_head.pixel_decoder.*`` of a checkpoint, prefix removed) loads unchanged.

Deviations, none of which changes a value: the encoder builds no padding mask and no valid
ratios (the official ones are all False and all 1, msdeformattn.py:62 and :84, since the
official forward never passes a mask); GroupNorm's group count is a size
(``PixelDecoderSizes.gn_groups``, official 32) so that tiny test models can use few channels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from incseg.models.mask2former.decoder import activation_fn, c2_xavier_fill
from incseg.models.mask2former.deform_attn import MSDeformAttn
from incseg.models.mask2former.position import PositionEmbeddingSine

Tensor = torch.Tensor


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then FFN, both post-norm (msdeformattn.py:92-131).

    ``forward(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None)``:
    ``src``/``pos`` (N, S, C), ``reference_points`` (N, S, L, 2) -> (N, S, C).
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Tensor | None,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        query = src if pos is None else src + pos
        attended = self.self_attn(
            query, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(attended))
        hidden = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(hidden))


def encoder_reference_points(spatial_shapes: Tensor, device: torch.device) -> Tensor:
    """Pixel centres of every level in [0, 1] (x, y), one per level: (1, S, L, 2) float32.

    ``get_reference_points`` of msdeformattn.py:141-153 with all valid ratios 1 (no padding),
    where dividing and multiplying by them are exact no-ops.
    """
    points = []
    for h, w in spatial_shapes.tolist():
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        points.append(torch.stack((xs.reshape(-1)[None] / w, ys.reshape(-1)[None] / h), -1))
    # A query of any level samples every level around the same relative position.
    return torch.cat(points, 1)[:, :, None].expand(-1, -1, len(points), -1)


class MSDeformAttnTransformerEncoder(nn.Module):
    """``num_layers`` deep copies of ``encoder_layer`` (msdeformattn.py:134-161)."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int) -> None:
        super().__init__()
        # Deep copies, as the official _get_clones: the layers start equal until re-initialised.
        self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(
        self,
        src: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        pos: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """(N, S, C) -> (N, S, C)."""
        reference_points = encoder_reference_points(spatial_shapes, src.device)
        reference_points = reference_points.expand(src.shape[0], -1, -1, -1)
        output = src
        for layer in self.layers:
            output = layer(
                output, pos, reference_points, spatial_shapes, level_start_index, padding_mask
            )
        return output


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """The deformable transformer encoder over L feature levels (msdeformattn.py:23-89).

    Parameters: ``encoder.layers.<i>.*`` and ``level_embed`` (L, d_model), initialised as the
    official ``_reset_parameters`` (msdeformattn.py:43-50): xavier on every matrix, then the
    deformable-attention init, then a standard normal level embedding.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        layer = MSDeformAttnTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead, enc_n_points
        )
        self.encoder = MSDeformAttnTransformerEncoder(layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # level_embed is a matrix too: its xavier draw happens (and is overwritten), as officially.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(
        self, srcs: Sequence[Tensor], pos_embeds: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``srcs``/``pos_embeds``: L maps (N, C, H_l, W_l) -> memory (N, S, C), spatial shapes
        (L, 2) long, level start indices (L,) long (msdeformattn.py:61-89)."""
        flat_src, flat_pos, shapes = [], [], []
        for level, (src, pos) in enumerate(zip(srcs, pos_embeds)):
            shapes.append(src.shape[-2:])
            flat_src.append(src.flatten(2).transpose(1, 2))
            level_pos = pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
            flat_pos.append(level_pos)
        src_flatten = torch.cat(flat_src, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flatten.device)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        )
        memory = self.encoder(
            src_flatten, spatial_shapes, level_start_index, torch.cat(flat_pos, 1)
        )
        return memory, spatial_shapes, level_start_index


class ConvNormAct(nn.Conv2d):
    """detectron2's ``layers.Conv2d``: a Conv2d with an optional ``norm`` submodule and activation.

    Keys as detectron2's: ``weight``, ``bias`` (if any), ``norm.weight``, ``norm.bias``.
    """

    def __init__(
        self,
        *args,
        norm: nn.Module | None = None,
        activation: Callable[[Tensor], Tensor] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


@dataclass(frozen=True)
class PixelDecoderSizes:
    """The sizes and options of :class:`MSDeformAttnPixelDecoder`.

    Defaults follow ``configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml:9-17``;
    the official decoder reads its keys in ``from_config`` (msdeformattn.py:295-312).
    """

    conv_dim: int = 256
    """Channels of every intermediate map (MODEL.SEM_SEG_HEAD.CONVS_DIM, 256 in ADE20K)."""
    mask_dim: int = 256
    """Channels of ``mask_features`` (MODEL.SEM_SEG_HEAD.MASK_DIM, 256)."""
    transformer_in_features: tuple[str, ...] = ("res3", "res4", "res5")
    """The features fed to the deformable encoder
    (MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES, res3-res5)."""
    encoder_layers: int = 6
    """Depth of the deformable encoder (MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS, 6)."""
    heads: int = 8
    """Attention heads of the encoder (MODEL.MASK_FORMER.NHEADS, 8)."""
    dim_feedforward: int = 1024
    """FFN width of the encoder: 1024 whatever the config says (msdeformattn.py:306 ignores
    MODEL.MASK_FORMER.DIM_FEEDFORWARD)."""
    dropout: float = 0.0
    """Dropout of the encoder (MODEL.MASK_FORMER.DROPOUT, 0.0 in ADE20K)."""
    common_stride: int = 4
    """Stride of ``mask_features`` (MODEL.SEM_SEG_HEAD.COMMON_STRIDE); FPN levels are added from
    the finest encoder level down to it (1 level, res2, for strides 8 -> 4)."""
    norm: str = "GN"
    """Norm of the FPN convs (MODEL.SEM_SEG_HEAD.NORM): ``"GN"`` (official ADE20K) or ``""``
    (no norm, conv bias)."""
    gn_groups: int = 32
    """Groups of every GroupNorm; officially 32, hard-coded (no config key; a deviation only if
    changed), so ``conv_dim`` must be a multiple of it."""


def _check_sizes(input_shape: Mapping[str, tuple[int, int]], sizes: PixelDecoderSizes) -> None:
    """Reject the sizes :class:`MSDeformAttnPixelDecoder` cannot build from ``input_shape``."""
    if sizes.norm not in ("GN", ""):
        raise ValueError(f"MSDeformAttnPixelDecoder: norm must be 'GN' or '', got {sizes.norm!r}")
    if sizes.conv_dim % sizes.gn_groups != 0:
        raise ValueError(
            f"conv_dim {sizes.conv_dim} is not a multiple of gn_groups {sizes.gn_groups}"
        )
    missing = [f for f in sizes.transformer_in_features if f not in input_shape]
    if missing:
        raise ValueError(f"transformer_in_features {missing} are not in input_shape")


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention encoder on the coarse levels + FPN on the fine ones (msdeformattn.py:164-358).

    Args:
        input_shape: backbone feature name -> (channels, stride), e.g. ``res2``..``res5`` of
            :meth:`ResNetFeatures.output_shape`.
        sizes: a :class:`PixelDecoderSizes`; its defaults follow
            ``configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml:9-17``.

    Submodules: ``input_proj.<l>`` (Conv 1x1 + GroupNorm, coarse to fine), ``transformer``,
    ``pe_layer``, ``mask_features`` (Conv 1x1), ``adapter_<i>``/``layer_<i>`` (FPN lateral 1x1
    and output 3x3 convs with ``norm``; i = 1 for the finest feature).
    """

    def __init__(
        self,
        input_shape: Mapping[str, tuple[int, int]],
        sizes: PixelDecoderSizes = PixelDecoderSizes(),
    ) -> None:
        super().__init__()
        _check_sizes(input_shape, sizes)
        conv_dim = sizes.conv_dim
        self._record_features(input_shape, sizes.transformer_in_features)
        self._build_input_proj(input_shape, conv_dim, sizes.gn_groups)
        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            dropout=sizes.dropout,
            nhead=sizes.heads,
            dim_feedforward=sizes.dim_feedforward,
            num_encoder_layers=sizes.encoder_layers,
            num_feature_levels=self.transformer_num_feature_levels,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_dim = sizes.mask_dim
        self.mask_features = nn.Conv2d(conv_dim, sizes.mask_dim, kernel_size=1, stride=1, padding=0)
        c2_xavier_fill(self.mask_features)
        self.maskformer_num_feature_levels = 3  # the transformer decoder always reads 3 scales
        self.common_stride = sizes.common_stride
        self.num_fpn_levels = int(
            math.log2(min(self.transformer_feature_strides)) - math.log2(sizes.common_stride)
        )
        self._build_fpn(conv_dim, sizes.norm, sizes.gn_groups)

    def _record_features(
        self, input_shape: Mapping[str, tuple[int, int]], transformer_in_features: Sequence[str]
    ) -> None:
        """The backbone features and those of the encoder, fine to coarse, with their strides."""
        ordered = sorted(input_shape.items(), key=lambda item: item[1][1])
        self.in_features = [name for name, _ in ordered]  # fine to coarse
        self.feature_strides = [stride for _, (_, stride) in ordered]
        self.feature_channels = [channels for _, (channels, _) in ordered]
        in_transformer = [(n, s) for n, s in ordered if n in transformer_in_features]
        self.transformer_in_features = [name for name, _ in in_transformer]
        self.transformer_feature_strides = [stride for _, (_, stride) in in_transformer]
        self.transformer_num_feature_levels = len(in_transformer)

    def _build_input_proj(
        self, input_shape: Mapping[str, tuple[int, int]], conv_dim: int, gn_groups: int
    ) -> None:
        """``input_proj.<l>``: Conv 1x1 + GroupNorm per encoder level, coarse to fine, the order
        the encoder sees the levels (msdeformattn.py:212-230)."""
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(input_shape[name][0], conv_dim, kernel_size=1),
                nn.GroupNorm(gn_groups, conv_dim),
            )
            for name in reversed(self.transformer_in_features)
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

    def _build_fpn(self, conv_dim: int, norm: str, gn_groups: int) -> None:
        """``adapter_<i>``/``layer_<i>`` for the features finer than the encoder's (msdeformattn.py:261-292)."""
        use_bias = norm == ""

        def make_norm() -> nn.Module | None:
            return nn.GroupNorm(gn_groups, conv_dim) if norm == "GN" else None

        for index, channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral_norm, output_norm = make_norm(), make_norm()
            lateral = ConvNormAct(
                channels, conv_dim, kernel_size=1, bias=use_bias, norm=lateral_norm
            )
            output = ConvNormAct(
                conv_dim,
                conv_dim,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=use_bias,
                norm=output_norm,
                activation=F.relu,
            )
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.add_module(f"adapter_{index + 1}", lateral)
            self.add_module(f"layer_{index + 1}", output)

    def forward_features(
        self, features: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Encode the multi-scale features (msdeformattn.py:314-358), in float32 with autocast off.

        Args:
            features: name -> (B, C_name, H / stride, W / stride), as ``input_shape``.

        Returns:
            ``mask_features`` (B, mask_dim, H / common_stride, W / common_stride);
            ``transformer_encoder_features`` (B, conv_dim, H/32, W/32), the coarsest encoder
            output; ``multi_scale_features``: the first 3 maps from coarse to fine (encoder
            outputs res5, res4, res3 for the default config), (B, conv_dim, H_l, W_l) each.
        """
        device_type = next(iter(features.values())).device.type
        # The official decoder disables CUDA autocast here; deformable attention runs in float32.
        with torch.autocast(device_type=device_type, enabled=False):
            srcs, pos = [], []
            for index, name in enumerate(reversed(self.transformer_in_features)):
                x = features[name].float()
                srcs.append(self.input_proj[index](x))
                pos.append(self.pe_layer(x))
            memory, spatial_shapes, _ = self.transformer(srcs, pos)
            batch = memory.shape[0]
            shapes = spatial_shapes.tolist()
            levels = memory.split([h * w for h, w in shapes], dim=1)
            out = [z.transpose(1, 2).reshape(batch, -1, h, w) for z, (h, w) in zip(levels, shapes)]
            # FPN top-down from the finest encoder level; adapter_i reads in_features[i - 1].
            for i in range(self.num_fpn_levels, 0, -1):
                lateral = getattr(self, f"adapter_{i}")(features[self.in_features[i - 1]].float())
                # Bilinear, as the official code (its comment says nearest).
                up = F.interpolate(
                    out[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
                )
                out.append(getattr(self, f"layer_{i}")(lateral + up))
            multi_scale = out[: self.maskformer_num_feature_levels]
            return self.mask_features(out[-1]), out[0], multi_scale

    def forward(self, features: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Same as :meth:`forward_features`."""
        return self.forward_features(features)
