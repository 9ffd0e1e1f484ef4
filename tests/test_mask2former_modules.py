"""Mask2Former modules against re-statements of the official code (Mask2Former 9b0651c).

The ``Ref*`` classes and ``ref_*`` functions below restate, operation by operation, the official
modules (detectron2 and fvcore helpers inlined) so that the port can be compared on the same
random inputs: equal initialisation under a seed, equal outputs and equal gradients.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from incseg.models.mask2former import (
    DecoderSizes,
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    MultiScaleMaskedTransformerDecoder,
    PixelDecoderSizes,
    PositionEmbeddingSine,
    ResNetFeatures,
    TinyFeatures,
    allow_empty_rows,
    attention_mask_from_masks,
    ms_deform_attn,
)

# ---------------------------------------------------------------------------------------------
# Re-statements of the official code.


def ref_ms_deform_attn_core_pytorch(
    value, value_spatial_shapes, sampling_locations, attention_weights
):
    # ops/functions/ms_deform_attn_func.py:52-72
    N_, _, M_, D_ = value.shape
    _, Lq_, M_, L_, P_, _ = sampling_locations.shape
    value_list = value.split([H_ * W_ for H_, W_ in value_spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for lid_, (H_, W_) in enumerate(value_spatial_shapes):
        value_l_ = value_list[lid_].flatten(2).transpose(1, 2).reshape(N_ * M_, D_, H_, W_)
        sampling_grid_l_ = sampling_grids[:, :, :, lid_].transpose(1, 2).flatten(0, 1)
        sampling_value_l_ = F.grid_sample(
            value_l_, sampling_grid_l_, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        sampling_value_list.append(sampling_value_l_)
    attention_weights = attention_weights.transpose(1, 2).reshape(N_ * M_, 1, Lq_, L_ * P_)
    output = (
        (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights)
        .sum(-1)
        .view(N_, M_ * D_, Lq_)
    )
    return output.transpose(1, 2).contiguous()


class RefMSDeformAttn(nn.Module):
    # ops/modules/ms_deform_attn.py:34-125 (the CPU fallback path)
    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points = (
            d_model,
            n_levels,
            n_heads,
            n_points,
        )
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight.data, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (
            (grid_init / grid_init.abs().max(-1, keepdim=True)[0])
            .view(self.n_heads, 1, 1, 2)
            .repeat(1, self.n_levels, self.n_points, 1)
        )
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight.data, 0.0)
        nn.init.constant_(self.attention_weights.bias.data, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight.data)
        nn.init.constant_(self.value_proj.bias.data, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight.data)
        nn.init.constant_(self.output_proj.bias.data, 0.0)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):  # fmt: skip
        N, Len_q, _ = query.shape
        N, Len_in, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], float(0))
        value = value.view(N, Len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(
            N, Len_q, self.n_heads, self.n_levels, self.n_points, 2
        )
        attention_weights = self.attention_weights(query).view(
            N, Len_q, self.n_heads, self.n_levels * self.n_points
        )
        attention_weights = F.softmax(attention_weights, -1).view(
            N, Len_q, self.n_heads, self.n_levels, self.n_points
        )
        offset_normalizer = torch.stack(
            [input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1
        )
        sampling_locations = (
            reference_points[:, :, None, :, None, :]
            + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        )
        output = ref_ms_deform_attn_core_pytorch(
            value, input_spatial_shapes, sampling_locations, attention_weights
        )
        return self.output_proj(output)


class RefPositionEmbeddingSine(nn.Module):
    # transformer_decoder/position_encoding.py:12-52
    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None):
        super().__init__()
        self.num_pos_feats, self.temperature, self.normalize = num_pos_feats, temperature, normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x, mask=None):
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack(
            (pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4
        ).flatten(3)
        pos_y = torch.stack(
            (pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4
        ).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def ref_c2_xavier_fill(module):
    # fvcore.nn.weight_init.c2_xavier_fill
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


class RefD2Conv2d(nn.Conv2d):
    # detectron2.layers.Conv2d (norm and activation after the convolution)
    def __init__(self, *args, **kwargs):
        norm = kwargs.pop("norm", None)
        activation = kwargs.pop("activation", None)
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        x = F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class RefEncoderLayer(nn.Module):
    # pixel_decoder/msdeformattn.py:92-131
    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4, n_heads=8,
                 n_points=4):  # fmt: skip
        super().__init__()
        self.self_attn = RefMSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = F.relu
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None
    ):
        src2 = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class RefEncoder(nn.Module):
    # pixel_decoder/msdeformattn.py:134-161
    def __init__(self, encoder_layer, num_layers):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios, device):
        reference_points_list = []
        for lvl, (H_, W_) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, H_ - 0.5, H_, dtype=torch.float32, device=device),
                torch.linspace(0.5, W_ - 0.5, W_, dtype=torch.float32, device=device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H_)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W_)
            reference_points_list.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(reference_points_list, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self, src, spatial_shapes, level_start_index, valid_ratios, pos=None, padding_mask=None
    ):
        output = src
        reference_points = self.get_reference_points(
            spatial_shapes, valid_ratios, device=src.device
        )
        for layer in self.layers:
            output = layer(
                output, pos, reference_points, spatial_shapes, level_start_index, padding_mask
            )
        return output


class RefEncoderOnly(nn.Module):
    # pixel_decoder/msdeformattn.py:23-89
    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, dim_feedforward=1024, dropout=0.1,
                 num_feature_levels=4, enc_n_points=4):  # fmt: skip
        super().__init__()
        encoder_layer = RefEncoderLayer(
            d_model, dim_feedforward, dropout, "relu", num_feature_levels, nhead, enc_n_points
        )
        self.encoder = RefEncoder(encoder_layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.Tensor(num_feature_levels, d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, RefMSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_valid_ratio(mask):
        _, H, W = mask.shape
        valid_H = torch.sum(~mask[:, :, 0], 1)
        valid_W = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_W.float() / W, valid_H.float() / H], -1)

    def forward(self, srcs, pos_embeds):
        masks = [
            torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
            for x in srcs
        ]
        src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes = [], [], [], []
        for lvl, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            _, _, h, w = src.shape
            spatial_shapes.append((h, w))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            lvl_pos_embed_flatten.append(
                pos_embed.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
            )
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
        spatial_shapes = torch.as_tensor(
            spatial_shapes, dtype=torch.long, device=src_flatten.device
        )
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        )
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)
        memory = self.encoder(
            src_flatten,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            lvl_pos_embed_flatten,
            mask_flatten,
        )
        return memory, spatial_shapes, level_start_index


class RefPixelDecoder(nn.Module):
    # pixel_decoder/msdeformattn.py:164-358, with get_norm("GN", C) = GroupNorm(32, C)
    def __init__(self, input_shape, transformer_dropout, transformer_nheads, transformer_dim_feedforward,
                 transformer_enc_layers, conv_dim, mask_dim, norm, transformer_in_features, common_stride):  # fmt: skip
        super().__init__()
        transformer_input_shape = {
            k: v for k, v in input_shape.items() if k in transformer_in_features
        }
        input_shape = sorted(input_shape.items(), key=lambda x: x[1][1])
        self.in_features = [k for k, v in input_shape]
        self.feature_channels = [v[0] for k, v in input_shape]
        transformer_input_shape = sorted(transformer_input_shape.items(), key=lambda x: x[1][1])
        self.transformer_in_features = [k for k, v in transformer_input_shape]
        transformer_in_channels = [v[0] for k, v in transformer_input_shape]
        self.transformer_feature_strides = [v[1] for k, v in transformer_input_shape]
        self.transformer_num_feature_levels = len(self.transformer_in_features)
        self.input_proj = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
                for c in transformer_in_channels[::-1]
            ]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.transformer = RefEncoderOnly(
            d_model=conv_dim, dropout=transformer_dropout, nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward, num_encoder_layers=transformer_enc_layers,
            num_feature_levels=self.transformer_num_feature_levels,
        )  # fmt: skip
        self.pe_layer = RefPositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_features = RefD2Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        ref_c2_xavier_fill(self.mask_features)
        self.maskformer_num_feature_levels = 3
        stride = min(self.transformer_feature_strides)
        self.num_fpn_levels = int(math.log2(stride) - math.log2(common_stride))
        lateral_convs, output_convs = [], []
        use_bias = norm == ""
        for idx, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral_norm = nn.GroupNorm(32, conv_dim) if norm == "GN" else None
            output_norm = nn.GroupNorm(32, conv_dim) if norm == "GN" else None
            lateral_conv = RefD2Conv2d(
                in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=lateral_norm
            )
            output_conv = RefD2Conv2d(conv_dim, conv_dim, kernel_size=3, stride=1, padding=1, bias=use_bias,
                                      norm=output_norm, activation=F.relu)  # fmt: skip
            ref_c2_xavier_fill(lateral_conv)
            ref_c2_xavier_fill(output_conv)
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    def forward_features(self, features):
        srcs, pos = [], []
        for idx, f in enumerate(self.transformer_in_features[::-1]):
            x = features[f].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        y, spatial_shapes, level_start_index = self.transformer(srcs, pos)
        bs = y.shape[0]
        split_size_or_sections = [None] * self.transformer_num_feature_levels
        for i in range(self.transformer_num_feature_levels):
            if i < self.transformer_num_feature_levels - 1:
                split_size_or_sections[i] = level_start_index[i + 1] - level_start_index[i]
            else:
                split_size_or_sections[i] = y.shape[1] - level_start_index[i]
        y = torch.split(y, [int(s) for s in split_size_or_sections], dim=1)
        out, multi_scale_features, num_cur_levels = [], [], 0
        for i, z in enumerate(y):
            out.append(z.transpose(1, 2).view(bs, -1, spatial_shapes[i][0], spatial_shapes[i][1]))
        for idx, f in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            x = features[f].float()
            cur_fpn = self.lateral_convs[idx](x)
            y = cur_fpn + F.interpolate(
                out[-1], size=cur_fpn.shape[-2:], mode="bilinear", align_corners=False
            )
            out.append(self.output_convs[idx](y))
        for o in out:
            if num_cur_levels < self.maskformer_num_feature_levels:
                multi_scale_features.append(o)
                num_cur_levels += 1
        return self.mask_features(out[-1]), out[0], multi_scale_features


def _with_pos(t, pos):
    return t if pos is None else t + pos


class RefSelfAttentionLayer(nn.Module):
    # transformer_decoder/mask2former_transformer_decoder.py:17-72
    def __init__(self, d_model, nhead, dropout=0.0, normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt, tgt_mask=None, tgt_key_padding_mask=None, query_pos=None):
        if self.normalize_before:
            tgt2 = self.norm(tgt)
            q = k = _with_pos(tgt2, query_pos)
            tgt2 = self.self_attn(
                q, k, value=tgt2, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask
            )[0]
            return tgt + self.dropout(tgt2)
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(
            q, k, value=tgt, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask
        )[0]
        return self.norm(tgt + self.dropout(tgt2))


class RefCrossAttentionLayer(nn.Module):
    # transformer_decoder/mask2former_transformer_decoder.py:75-135
    def __init__(self, d_model, nhead, dropout=0.0, normalize_before=False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, tgt, memory, memory_mask=None, memory_key_padding_mask=None, pos=None, query_pos=None
    ):
        if self.normalize_before:
            tgt2 = self.norm(tgt)
            tgt2 = self.multihead_attn(query=_with_pos(tgt2, query_pos), key=_with_pos(memory, pos), value=memory,
                                       attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]  # fmt: skip
            return tgt + self.dropout(tgt2)
        tgt2 = self.multihead_attn(query=_with_pos(tgt, query_pos), key=_with_pos(memory, pos), value=memory,
                                   attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]  # fmt: skip
        return self.norm(tgt + self.dropout(tgt2))


class RefFFNLayer(nn.Module):
    # transformer_decoder/mask2former_transformer_decoder.py:138-178
    def __init__(self, d_model, dim_feedforward=2048, dropout=0.0, normalize_before=False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt):
        if self.normalize_before:
            tgt2 = self.linear2(self.dropout(F.relu(self.linear1(self.norm(tgt)))))
            return tgt + self.dropout(tgt2)
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm(tgt + self.dropout(tgt2))


class RefMLP(nn.Module):
    # transformer_decoder/mask2former_transformer_decoder.py:192-204
    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim])
        )

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def ref_attn_mask(outputs_mask, attn_mask_target_size, num_heads):
    # transformer_decoder/mask2former_transformer_decoder.py:442-446
    attn_mask = F.interpolate(
        outputs_mask, size=attn_mask_target_size, mode="bilinear", align_corners=False
    )
    attn_mask = (
        attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, num_heads, 1, 1).flatten(0, 1) < 0.5
    ).bool()
    return attn_mask.detach()


class RefDecoder(nn.Module):
    # transformer_decoder/mask2former_transformer_decoder.py:236-461
    def __init__(self, in_channels, num_classes, hidden_dim, num_queries, nheads, dim_feedforward, dec_layers,
                 pre_norm, mask_dim, enforce_input_project):  # fmt: skip
        super().__init__()
        self.pe_layer = RefPositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads, self.num_layers = nheads, dec_layers
        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(self.num_layers):
            self.transformer_self_attention_layers.append(
                RefSelfAttentionLayer(hidden_dim, nheads, 0.0, pre_norm)
            )
            self.transformer_cross_attention_layers.append(
                RefCrossAttentionLayer(hidden_dim, nheads, 0.0, pre_norm)
            )
            self.transformer_ffn_layers.append(
                RefFFNLayer(hidden_dim, dim_feedforward, 0.0, pre_norm)
            )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.num_feature_levels = 3
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                self.input_proj.append(RefD2Conv2d(in_channels, hidden_dim, kernel_size=1))
                ref_c2_xavier_fill(self.input_proj[-1])
            else:
                self.input_proj.append(nn.Sequential())
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = RefMLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, x, mask_features):
        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append(x[i].shape[-2:])
            pos.append(self.pe_layer(x[i], None).flatten(2))
            src.append(
                self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            )
            pos[-1] = pos[-1].permute(2, 0, 1)
            src[-1] = src[-1].permute(2, 0, 1)
        _, bs, _ = src[0].shape
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
            output, mask_features, size_list[0]
        )
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)
        for i in range(self.num_layers):
            level_index = i % self.num_feature_levels
            attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
            output = self.transformer_cross_attention_layers[i](
                output, src[level_index], memory_mask=attn_mask, memory_key_padding_mask=None,
                pos=pos[level_index], query_pos=query_embed,
            )  # fmt: skip
            output = self.transformer_self_attention_layers[i](
                output, tgt_mask=None, tgt_key_padding_mask=None, query_pos=query_embed
            )
            output = self.transformer_ffn_layers[i](output)
            outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
                output, mask_features, size_list[(i + 1) % self.num_feature_levels]
            )
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)
        return {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": [
                {"pred_logits": a, "pred_masks": b}
                for a, b in zip(predictions_class[:-1], predictions_mask[:-1])
            ],
        }

    def forward_prediction_heads(self, output, mask_features, attn_mask_target_size):
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        return (
            outputs_class,
            outputs_mask,
            ref_attn_mask(outputs_mask, attn_mask_target_size, self.num_heads),
        )


# ---------------------------------------------------------------------------------------------
# Helpers and tiny configurations.

TINY_SHAPE = {"res2": (16, 4), "res3": (32, 8), "res4": (48, 16), "res5": (64, 32)}
PIXEL_KW = {"conv_dim": 32, "mask_dim": 32, "encoder_layers": 2, "heads": 4, "dim_feedforward": 64}
DECODER_KW = {
    "num_classes": 5,
    "hidden_dim": 32,
    "num_queries": 6,
    "nheads": 4,
    "dim_feedforward": 64,
    "dec_layers": 4,
    "mask_dim": 32,
}


def tiny_features(batch=2, height=64, width=96):
    """Random backbone features of a (height, width) image; non-square to catch H/W swaps."""
    return {
        name: torch.randn(batch, channels, height // stride, width // stride)
        for name, (channels, stride) in TINY_SHAPE.items()
    }


def tiny_decoder_inputs(batch=2, channels=32):
    x = [torch.randn(batch, channels, 2 * k, 3 * k) for k in (1, 2, 4)]
    return x, torch.randn(batch, 32, 16, 24)


def make_pixel_decoders(seed=0):
    torch.manual_seed(seed)
    ours = MSDeformAttnPixelDecoder(TINY_SHAPE, PixelDecoderSizes(**PIXEL_KW))
    torch.manual_seed(seed)
    ref = RefPixelDecoder(
        TINY_SHAPE, transformer_dropout=0.0, transformer_nheads=4, transformer_dim_feedforward=64,
        transformer_enc_layers=2, conv_dim=32, mask_dim=32, norm="GN",
        transformer_in_features=["res3", "res4", "res5"], common_stride=4,
    )  # fmt: skip
    return ours, ref


def make_decoder(in_channels, num_classes, **sizes):
    """Our decoder from the official constructor's keyword arguments."""
    return MultiScaleMaskedTransformerDecoder(in_channels, num_classes, DecoderSizes(**sizes))


def make_decoders(seed=0, **overrides):
    kw = dict(in_channels=32, pre_norm=False, enforce_input_project=False, **DECODER_KW)
    kw.update(overrides)
    torch.manual_seed(seed)
    ours = make_decoder(**kw)
    torch.manual_seed(seed)
    ref = RefDecoder(**kw)
    return ours, ref


def assert_same_state(ours, ref):
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_grads(ours, ref, atol=1e-6):
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=atol, rtol=1e-5, msg=name)


def flatten_outputs(out):
    tensors = [out["pred_logits"], out["pred_masks"]]
    for aux in out["aux_outputs"]:
        tensors += [aux["pred_logits"], aux["pred_masks"]]
    return tensors


# ---------------------------------------------------------------------------------------------
# ms_deform_attn and MSDeformAttn.


def test_ms_deform_attn_matches_official_values_and_gradients():
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    n, heads, dim, n_queries, points = 2, 2, 3, 5, 3
    value = torch.randn(n, sum(h * w for h, w in shapes), heads, dim, requires_grad=True)
    # Some locations fall outside [0, 1] to exercise the zero padding.
    locations = (
        torch.rand(n, n_queries, heads, len(shapes), points, 2) * 1.2 - 0.1
    ).requires_grad_()
    weights = torch.rand(n, n_queries, heads, len(shapes), points, requires_grad=True)
    upstream = torch.randn(n, n_queries, heads * dim)
    results = []
    for fn, spatial in (
        (ms_deform_attn, torch.tensor(shapes)),
        (ref_ms_deform_attn_core_pytorch, shapes),
    ):
        out = fn(value, spatial, locations, weights)
        grads = torch.autograd.grad((out * upstream).sum(), (value, locations, weights))
        results.append((out, grads))
    (ours, our_grads), (ref, ref_grads) = results
    assert ours.shape == (n, n_queries, heads * dim)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    for g, r in zip(our_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=0)


def test_ms_deform_attn_hand_computed_points():
    # One 2x2 level [[1, 2], [3, 4]]; pixel (i, j) has its centre at ((j + .5) / 2, (i + .5) / 2).
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    points = torch.tensor([[0.25, 0.75], [0.5, 0.25], [0.5, 0.5], [0.0, 0.0]])
    locations = points.view(1, 4, 1, 1, 1, 2)
    out = ms_deform_attn(value, [(2, 2)], locations, torch.ones(1, 4, 1, 1, 1))
    # centre of (1, 0); halfway between (0, 0) and (0, 1); the middle; the image corner reads a
    # quarter of pixel (0, 0) (the other three bilinear neighbours are zero padding).
    torch.testing.assert_close(out.view(-1), torch.tensor([3.0, 1.5, 2.5, 0.25]))
    # Two points, weighted 0.25 and 0.75, at the centres of pixels (0, 1) and (1, 1).
    two = torch.tensor([[0.75, 0.25], [0.75, 0.75]]).view(1, 1, 1, 1, 2, 2)
    out = ms_deform_attn(value, [(2, 2)], two, torch.tensor([0.25, 0.75]).view(1, 1, 1, 1, 2))
    torch.testing.assert_close(out.view(-1), torch.tensor([0.25 * 2 + 0.75 * 4]))
    # Two heads: channels are head-major; head 1 reads the negated map.
    value2 = torch.stack([value, -value], dim=2).view(1, 4, 2, 1)
    loc2 = points[:1].view(1, 1, 1, 1, 1, 2).expand(1, 1, 2, 1, 1, 2)
    out = ms_deform_attn(value2, [(2, 2)], loc2, torch.ones(1, 1, 2, 1, 1))
    torch.testing.assert_close(out.view(-1), torch.tensor([3.0, -3.0]))


def test_ms_deform_attn_rejects_shapes_that_do_not_cover_value():
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(
            torch.zeros(1, 5, 1, 1),
            [(2, 2)],
            torch.zeros(1, 1, 1, 1, 1, 2),
            torch.ones(1, 1, 1, 1, 1),
        )


def test_msdeformattn_init_is_official():
    torch.manual_seed(3)
    ours = MSDeformAttn(d_model=32, n_levels=2, n_heads=8, n_points=3)
    torch.manual_seed(3)
    ref = RefMSDeformAttn(d_model=32, n_levels=2, n_heads=8, n_points=3)
    assert_same_state(ours, ref)
    grid = ours.sampling_offsets.bias.detach().view(8, 2, 3, 2)
    scale = torch.arange(1.0, 4.0)[:, None]
    # heads 0, 1, 2, 4: directions 0, 45, 90, 180 degrees on the unit square, p-th point at p + 1.
    for head, direction in ((0, (1.0, 0.0)), (1, (1.0, 1.0)), (2, (0.0, 1.0)), (4, (-1.0, 0.0))):
        for level in range(2):
            torch.testing.assert_close(
                grid[head, level], scale * torch.tensor(direction), atol=1e-6, rtol=0
            )
    assert not ours.sampling_offsets.weight.any() and not ours.attention_weights.weight.any()
    assert not ours.attention_weights.bias.any()
    assert not ours.value_proj.bias.any() and not ours.output_proj.bias.any()


def test_msdeformattn_forward_matches_official():
    torch.manual_seed(0)
    ours = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    with torch.no_grad():  # move away from the init, where offsets and weights ignore the query
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = RefMSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    ref.load_state_dict(ours.state_dict())
    shapes = torch.tensor([[3, 4], [2, 3]])
    start = torch.tensor([0, 12])
    query = torch.randn(2, 7, 16, requires_grad=True)
    memory = torch.randn(2, 18, 16, requires_grad=True)
    reference = torch.rand(2, 7, 2, 2, requires_grad=True)
    padding = torch.rand(2, 18) < 0.2
    upstream = torch.randn(2, 7, 16)
    outs = []
    for module in (ours, ref):
        out = module(query, reference, memory, shapes, start, padding)
        (out * upstream).sum().backward()
        outs.append(out)
        grads = [t.grad.clone() for t in (query, memory, reference)]
        outs.append(grads)
        for t in (query, memory, reference):
            t.grad = None
    torch.testing.assert_close(outs[0], outs[2], atol=1e-6, rtol=0)
    for g, r in zip(outs[1], outs[3]):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=0)
    assert_same_grads(ours, ref)


def test_msdeformattn_refuses_box_reference_points():
    module = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=1)
    with pytest.raises(ValueError, match="last dim 4"):
        module(torch.zeros(1, 2, 16), torch.zeros(1, 2, 1, 4), torch.zeros(1, 4, 16), torch.tensor([[2, 2]]),
               torch.tensor([0]))  # fmt: skip
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=4)


# ---------------------------------------------------------------------------------------------
# Position embedding.


@pytest.mark.parametrize("normalize", [True, False])
def test_position_embedding_matches_official(normalize):
    x = torch.zeros(2, 5, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, 2:, :] = True
    mask[1, :, 3:] = True
    ours, ref = (
        PositionEmbeddingSine(8, normalize=normalize),
        RefPositionEmbeddingSine(8, normalize=normalize),
    )
    for m in (None, mask):
        out = ours(x, m)
        assert out.shape == (2, 16, 3, 4) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref(x, m), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="normalize=True"):
        PositionEmbeddingSine(8, scale=1.0)


# ---------------------------------------------------------------------------------------------
# Pixel decoder.


def test_pixel_decoder_init_outputs_and_gradients_match_official():
    ours, ref = make_pixel_decoders()
    assert_same_state(ours, ref)  # same names, order and values under one seed
    feats = tiny_features()
    out_ours, out_ref = ours.forward_features(feats), ref.forward_features(feats)
    mask_features, encoder_features, multi_scale = out_ours
    assert mask_features.shape == (2, 32, 16, 24)
    assert encoder_features.shape == (2, 32, 2, 3)
    assert [tuple(m.shape[-2:]) for m in multi_scale] == [(2, 3), (4, 6), (8, 12)]  # coarse to fine
    flat_ours = [mask_features, encoder_features, *multi_scale]
    flat_ref = [out_ref[0], out_ref[1], *out_ref[2]]
    loss_ours = loss_ref = 0
    for a, b in zip(flat_ours, flat_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        weight = torch.randn_like(a)
        loss_ours, loss_ref = loss_ours + (a * weight).sum(), loss_ref + (b * weight).sum()
    loss_ours.backward()
    loss_ref.backward()
    assert_same_grads(ours, ref, atol=1e-5)


def test_pixel_decoder_state_dict_keys_are_official():
    pixel = MSDeformAttnPixelDecoder(
        TINY_SHAPE, PixelDecoderSizes(**{**PIXEL_KW, "encoder_layers": 1})
    )
    attn = "transformer.encoder.layers.0.self_attn."
    layer = "transformer.encoder.layers.0."
    expected = [
        "input_proj.0.0.weight", "input_proj.0.0.bias", "input_proj.0.1.weight", "input_proj.0.1.bias",
        "input_proj.1.0.weight", "input_proj.1.0.bias", "input_proj.1.1.weight", "input_proj.1.1.bias",
        "input_proj.2.0.weight", "input_proj.2.0.bias", "input_proj.2.1.weight", "input_proj.2.1.bias",
        "transformer.level_embed",
        attn + "sampling_offsets.weight", attn + "sampling_offsets.bias",
        attn + "attention_weights.weight", attn + "attention_weights.bias",
        attn + "value_proj.weight", attn + "value_proj.bias",
        attn + "output_proj.weight", attn + "output_proj.bias",
        layer + "norm1.weight", layer + "norm1.bias", layer + "linear1.weight", layer + "linear1.bias",
        layer + "linear2.weight", layer + "linear2.bias", layer + "norm2.weight", layer + "norm2.bias",
        "mask_features.weight", "mask_features.bias",
        "adapter_1.weight", "adapter_1.norm.weight", "adapter_1.norm.bias",
        "layer_1.weight", "layer_1.norm.weight", "layer_1.norm.bias",
    ]  # fmt: skip
    assert list(pixel.state_dict()) == expected
    sd = pixel.state_dict()
    assert sd["transformer.level_embed"].shape == (3, 32)
    assert sd[attn + "sampling_offsets.weight"].shape == (4 * 3 * 4 * 2, 32)
    assert sd[attn + "attention_weights.weight"].shape == (4 * 3 * 4, 32)
    assert sd["input_proj.0.0.weight"].shape == (32, 64, 1, 1)  # coarsest (res5) first
    assert sd["adapter_1.weight"].shape == (32, 16, 1, 1) and sd["layer_1.weight"].shape == (
        32,
        32,
        3,
        3,
    )
    bare = MSDeformAttnPixelDecoder(TINY_SHAPE, PixelDecoderSizes(**PIXEL_KW, norm=""))
    assert (
        "adapter_1.bias" in bare.state_dict() and "adapter_1.norm.weight" not in bare.state_dict()
    )


def test_pixel_decoder_options_autocast_and_errors():
    small = MSDeformAttnPixelDecoder(
        TINY_SHAPE, PixelDecoderSizes(**{**PIXEL_KW, "conv_dim": 16, "heads": 2}, gn_groups=4)
    )
    feats = tiny_features(batch=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask_features, _, multi_scale = small(feats)
    assert mask_features.dtype == torch.float32 and all(
        m.dtype == torch.float32 for m in multi_scale
    )
    assert small.input_proj[0][1].num_groups == 4
    with pytest.raises(ValueError, match="gn_groups"):
        MSDeformAttnPixelDecoder(TINY_SHAPE, PixelDecoderSizes(conv_dim=16))
    with pytest.raises(ValueError, match="norm"):
        MSDeformAttnPixelDecoder(TINY_SHAPE, PixelDecoderSizes(**PIXEL_KW, norm="BN"))
    with pytest.raises(ValueError, match="res6"):
        MSDeformAttnPixelDecoder(
            TINY_SHAPE, PixelDecoderSizes(**PIXEL_KW, transformer_in_features=("res5", "res6"))
        )


# ---------------------------------------------------------------------------------------------
# Transformer decoder.


@pytest.mark.parametrize(("pre_norm", "in_channels"), [(False, 32), (True, 24)])
def test_decoder_init_outputs_and_gradients_match_official(pre_norm, in_channels):
    ours, ref = make_decoders(pre_norm=pre_norm, in_channels=in_channels)
    assert_same_state(ours, ref)
    x, mask_features = tiny_decoder_inputs(channels=in_channels)
    out_ours, out_ref = ours(x, mask_features), ref(x, mask_features)
    assert len(out_ours["aux_outputs"]) == DECODER_KW["dec_layers"]
    loss_ours = loss_ref = 0
    for a, b in zip(flatten_outputs(out_ours), flatten_outputs(out_ref), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        weight = torch.randn_like(a)
        loss_ours, loss_ref = loss_ours + (a * weight).sum(), loss_ref + (b * weight).sum()
    loss_ours.backward()
    loss_ref.backward()
    assert_same_grads(ours, ref, atol=1e-5)


def test_decoder_shapes():
    decoder, _ = make_decoders()
    x, mask_features = tiny_decoder_inputs()
    out = decoder(x, mask_features, mask=torch.zeros(2, 64, 96, dtype=torch.bool))
    assert out["pred_logits"].shape == (2, 6, 6)
    assert out["pred_masks"].shape == (2, 6, 16, 24)
    assert len(out["aux_outputs"]) == 4 and "queries" not in out
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 6, 6) and aux["pred_masks"].shape == (2, 6, 16, 24)
    with pytest.raises(ValueError, match="3 feature maps"):
        decoder(x[:2], mask_features)


def test_decoder_state_dict_keys_are_official():
    decoder = make_decoder(24, **{**DECODER_KW, "dec_layers": 1}, enforce_input_project=True)
    sa, ca, ffn = (
        "transformer_self_attention_layers.0.",
        "transformer_cross_attention_layers.0.",
        "transformer_ffn_layers.0.",
    )
    expected = [
        sa + "self_attn.in_proj_weight", sa + "self_attn.in_proj_bias",
        sa + "self_attn.out_proj.weight", sa + "self_attn.out_proj.bias", sa + "norm.weight", sa + "norm.bias",
        ca + "multihead_attn.in_proj_weight", ca + "multihead_attn.in_proj_bias",
        ca + "multihead_attn.out_proj.weight", ca + "multihead_attn.out_proj.bias",
        ca + "norm.weight", ca + "norm.bias",
        ffn + "linear1.weight", ffn + "linear1.bias", ffn + "linear2.weight", ffn + "linear2.bias",
        ffn + "norm.weight", ffn + "norm.bias",
        "decoder_norm.weight", "decoder_norm.bias", "query_feat.weight", "query_embed.weight",
        "level_embed.weight",
        "input_proj.0.weight", "input_proj.0.bias", "input_proj.1.weight", "input_proj.1.bias",
        "input_proj.2.weight", "input_proj.2.bias",
        "class_embed.weight", "class_embed.bias",
        "mask_embed.layers.0.weight", "mask_embed.layers.0.bias", "mask_embed.layers.1.weight",
        "mask_embed.layers.1.bias", "mask_embed.layers.2.weight", "mask_embed.layers.2.bias",
    ]  # fmt: skip
    assert list(decoder.state_dict()) == expected
    assert decoder.state_dict()["class_embed.weight"].shape == (6, 32)
    identity = make_decoder(32, **DECODER_KW)
    assert not any(k.startswith("input_proj") for k in identity.state_dict())


def test_decoder_loads_pre_version_2_static_query():
    source = make_decoder(32, **DECODER_KW)
    parent = nn.Module()
    parent.predictor = make_decoder(32, **DECODER_KW)
    old = {
        f"predictor.{k.replace('query_feat', 'static_query')}": v
        for k, v in source.state_dict().items()
    }
    parent.load_state_dict(old)  # a plain dict: no version metadata, as an old checkpoint
    assert torch.equal(parent.predictor.query_feat.weight, source.query_feat.weight)


def test_attention_mask_matches_official_and_comformer():
    torch.manual_seed(0)
    pred_masks = torch.randn(2, 5, 16, 24)
    ours = attention_mask_from_masks(pred_masks, (4, 6), num_heads=3)
    assert ours.dtype == torch.bool and ours.shape == (6, 5, 24)
    assert torch.equal(ours, ref_attn_mask(pred_masks, (4, 6), 3))
    # CoMFormer: softmax over the queries instead of a per-query sigmoid.
    resized = F.interpolate(pred_masks, size=(4, 6), mode="bilinear", align_corners=False)
    expected = resized.softmax(dim=1).flatten(2).unsqueeze(1).repeat(1, 3, 1, 1).flatten(0, 1) < 0.5
    assert torch.equal(attention_mask_from_masks(pred_masks, (4, 6), 3, "softmax"), expected)
    with pytest.raises(ValueError, match="mask activation"):
        attention_mask_from_masks(pred_masks, (4, 6), 3, "tanh")
    with pytest.raises(ValueError, match="mask_activation"):
        make_decoder(32, **DECODER_KW, mask_activation="tanh")


def test_attention_mask_all_true_row_becomes_all_false():
    pred_masks = torch.full((1, 3, 4, 4), 5.0)
    pred_masks[0, 1] = -5.0  # query 1 is below 0.5 everywhere: it may attend nowhere
    pred_masks[0, 2, :2] = -5.0  # query 2 only in the bottom half
    attn = attention_mask_from_masks(pred_masks, (4, 4), num_heads=2)
    assert attn[:, 1].all()
    fixed = allow_empty_rows(attn)
    official = attn.clone()
    official[torch.where(official.sum(-1) == official.shape[-1])] = False
    assert torch.equal(fixed, official)
    assert not fixed[:, 1].any() and not fixed[:, 0].any()
    assert torch.equal(fixed[:, 2], attn[:, 2]) and fixed[:, 2].any()


def test_decoder_with_empty_masks_attends_everywhere_as_official():
    ours, ref = make_decoders()
    with torch.no_grad():  # every predicted mask is negative everywhere: all attention rows empty
        for decoder in (ours, ref):
            decoder.mask_embed.layers[2].weight.zero_()
            decoder.mask_embed.layers[2].bias.fill_(-1.0)
    x, mask_features = tiny_decoder_inputs()
    mask_features = mask_features.abs()
    out_ours, out_ref = ours(x, mask_features), ref(x, mask_features)
    for a, b in zip(flatten_outputs(out_ours), flatten_outputs(out_ref), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_decoder_softmax_mask_activation_runs():
    decoder, _ = make_decoders()
    decoder.mask_activation = "softmax"
    x, mask_features = tiny_decoder_inputs()
    assert torch.isfinite(decoder(x, mask_features)["pred_masks"]).all()


def test_add_queries_extends_every_prediction():
    decoder, _ = make_decoders()
    x, mask_features = tiny_decoder_inputs()
    assert decoder.add_queries(3) == range(6, 9)
    assert decoder.add_queries(2) == range(9, 11)
    assert decoder.total_queries == 11 and decoder.num_queries == 6
    out = decoder(x, mask_features)
    assert out["pred_logits"].shape == (2, 11, 6) and out["pred_masks"].shape == (2, 11, 16, 24)
    assert all(aux["pred_logits"].shape[1] == 11 for aux in out["aux_outputs"])
    keys = decoder.state_dict()
    assert keys["extra_query_feat.0.weight"].shape == (3, 32) and keys[
        "extra_query_embed.1.weight"
    ].shape == (2, 32)
    out["pred_logits"].sum().backward()
    assert decoder.extra_query_feat[1].weight.grad is not None
    with pytest.raises(ValueError, match="at least 1"):
        decoder.add_queries(0)


def test_self_attn_mask_keeps_query_groups_apart():
    decoder, _ = make_decoders()
    x, mask_features = tiny_decoder_inputs()
    alone = decoder(x, mask_features, return_queries=True)  # group A: the 6 base queries only
    decoder.add_queries(4)  # group B
    blocks = torch.ones(10, 10, dtype=torch.bool)
    blocks[:6, :6] = False
    blocks[6:, 6:] = False
    together = decoder(x, mask_features, self_attn_mask=blocks, return_queries=True)
    for a, b in zip(alone["queries"], together["queries"], strict=True):
        torch.testing.assert_close(b[:, :6], a, atol=1e-5, rtol=1e-5)
    for a, b in zip(flatten_outputs(alone), flatten_outputs(together), strict=True):
        torch.testing.assert_close(b[:, :6], a, atol=1e-5, rtol=1e-5)
    # Without the mask group B changes group A: the test above would fail if the mask were ignored.
    mixed = decoder(x, mask_features)
    assert not torch.allclose(mixed["pred_logits"][:, :6], alone["pred_logits"], atol=1e-3)
    with pytest.raises(ValueError, match="self_attn_mask"):
        decoder(x, mask_features, self_attn_mask=blocks[:6, :6])
    with pytest.raises(ValueError, match="self_attn_mask"):
        decoder(x, mask_features, self_attn_mask=blocks.float())


def test_return_queries_align_with_predictions():
    decoder, _ = make_decoders()
    x, mask_features = tiny_decoder_inputs()
    out = decoder(x, mask_features, return_queries=True)
    queries = out["queries"]
    assert len(queries) == DECODER_KW["dec_layers"] + 1
    assert all(q.shape == (2, 6, 32) for q in queries)
    logits = [aux["pred_logits"] for aux in out["aux_outputs"]] + [out["pred_logits"]]
    for q, lg in zip(queries, logits, strict=True):  # states before decoder_norm
        torch.testing.assert_close(decoder.class_embed(decoder.decoder_norm(q)), lg)
    torch.testing.assert_close(queries[0][1], decoder.query_feat.weight)  # the learnable queries


def test_class_embed_is_replaceable():
    decoder, _ = make_decoders()
    decoder.class_embed = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 9))
    x, mask_features = tiny_decoder_inputs()
    out = decoder(x, mask_features)
    assert out["pred_logits"].shape == (2, 6, 9)
    assert all(aux["pred_logits"].shape == (2, 6, 9) for aux in out["aux_outputs"])


# ---------------------------------------------------------------------------------------------
# Backbones and the whole network.


def test_tiny_features_interface():
    backbone = TinyFeatures()
    assert backbone.output_shape() == TINY_SHAPE
    out = backbone(torch.randn(2, 3, 64, 96))
    for name, (channels, stride) in TINY_SHAPE.items():
        assert out[name].shape == (2, channels, 64 // stride, 96 // stride)
    with pytest.raises(ValueError, match="4 stage"):
        TinyFeatures((8, 16))


def test_resnet_features_are_torchvision_resnet():
    backbone = ResNetFeatures(50, norm="frozen_bn").eval()
    assert backbone.output_shape() == {
        "res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)
    }  # fmt: skip
    assert isinstance(backbone.bn1, FrozenBatchNorm2d)
    assert backbone.layer2[0].conv2.stride == (2, 2) and backbone.layer2[0].conv1.stride == (1, 1)
    # A torchvision (BatchNorm) state dict without the classifier loads strictly.
    torchvision_state = torchvision.models.resnet50().state_dict()
    backbone.load_state_dict(
        {k: v for k, v in torchvision_state.items() if not k.startswith("fc.")}
    )
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64))
    for name, (channels, stride) in backbone.output_shape().items():
        assert out[name].shape == (1, channels, 64 // stride, 64 // stride)
    assert isinstance(ResNetFeatures(50, norm="syncbn").bn1, nn.SyncBatchNorm)
    with pytest.raises(ValueError, match="depth"):
        ResNetFeatures(34)
    with pytest.raises(ValueError, match="norm"):
        ResNetFeatures(50, norm="gn")


def _tiny_network():
    backbone = TinyFeatures()
    pixel = MSDeformAttnPixelDecoder(backbone.output_shape(), PixelDecoderSizes(**PIXEL_KW))
    decoder = make_decoder(32, **DECODER_KW)
    return nn.ModuleList([backbone, pixel, decoder])


def _run_network(net, images):
    mask_features, _, multi_scale = net[1].forward_features(net[0](images))
    return net[2](multi_scale, mask_features)


def test_tiny_network_end_to_end_trains_every_parameter():
    torch.manual_seed(0)
    net = _tiny_network()
    out = _run_network(net, torch.randn(2, 3, 64, 96))
    assert out["pred_logits"].shape == (2, 6, 6) and out["pred_masks"].shape == (2, 6, 16, 24)
    sum(t.sum() for t in flatten_outputs(out)).backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_network_on_cuda_matches_cpu():
    torch.manual_seed(0)
    net = _tiny_network().eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        cpu = flatten_outputs(_run_network(net, images))
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            gpu = flatten_outputs(_run_network(net.cuda(), images.cuda()))
            with torch.autocast("cuda", dtype=torch.float16):
                half = _run_network(net, images.cuda())
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(half["pred_masks"]).all()
