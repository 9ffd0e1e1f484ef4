"""DeepLabV3 ASPP head as used by MiB (SPEC section 7).

Four parallel branches without bias (1x1, and 3x3 with dilations ``rates``), concatenated, then
norm+act and a 1x1 reduction. A global pooling branch (mean, 1x1, norm+act, 1x1) is *added* to the
reduced map (not concatenated as in torchvision's DeepLabV3), then a final norm+act. No dropout.
"""

from __future__ import annotations

import torch
from torch import nn

from incseg.models.norm import norm_act

# Dilation rates per output stride; the official MiB code uses (12, 24, 32) at OS8.
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


class ASPP(nn.Module):
    """``(B, in_channels, h, w)`` features -> ``(B, out_channels, h, w)``."""

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, ...], norm: str) -> None:
        super().__init__()
        hidden = out_channels
        branches = [nn.Conv2d(in_channels, hidden, 1, bias=False)]
        branches += [
            nn.Conv2d(in_channels, hidden, 3, padding=r, dilation=r, bias=False) for r in rates
        ]
        self.branches = nn.ModuleList(branches)
        self.branch_norm = norm_act(hidden * len(branches), norm)
        self.reduce = nn.Conv2d(hidden * len(branches), out_channels, 1, bias=False)
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            norm_act(hidden, norm),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
        )
        self.out_norm = norm_act(out_channels, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = torch.cat([branch(x) for branch in self.branches], dim=1)
        main = self.reduce(self.branch_norm(main))
        # The pooled (B, C, 1, 1) branch broadcasts over the spatial grid.
        return self.out_norm(main + self.pool(x))
