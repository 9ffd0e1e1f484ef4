"""DeepLabV3 ASPP head as used by MiB (docs/protocol.md, "Model").

Four parallel branches without bias (1x1, and 3x3 with dilations ``rates``), concatenated, then
norm+act and a 1x1 reduction. A global pooling branch (mean, 1x1, norm+act, 1x1) is *added* to the
reduced map (not concatenated as in torchvision's DeepLabV3), then a final norm+act. No dropout.

Initialisation as the official head (fcdl94/MiB ``modules/deeplab.py:38-51``): every conv
Xavier-normal with the gain of the norm's activation (``calculate_gain("leaky_relu", 0.01)`` for
``iabn``, the official code's only activation; ``relu`` for ``bn``), conv biases 0, norm weights 1
and biases 0.
"""

from __future__ import annotations

import torch
from torch import nn

from incseg.models.norm import norm_act

# Dilation rates per output stride; the official MiB code uses (12, 24, 32) at OS8.
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


class ASPP(nn.Module):
    """``(B, in_channels, h, w)`` features -> ``(B, out_channels, h, w)``."""

    def __init__(
        self, in_channels: int, out_channels: int, rates: tuple[int, ...], norm: str
    ) -> None:
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
        self.reset_parameters(self.out_norm[1])

    def reset_parameters(self, act: nn.Module) -> None:
        """The official head's initialisation (module docstring); ``act`` is the norm's activation."""
        if isinstance(act, nn.LeakyReLU):
            gain = nn.init.calculate_gain("leaky_relu", act.negative_slope)
        else:
            gain = nn.init.calculate_gain("relu")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight, gain)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = torch.cat([branch(x) for branch in self.branches], dim=1)
        main = self.reduce(self.branch_norm(main))
        # The pooled (B, C, 1, 1) branch broadcasts over the spatial grid.
        return self.out_norm(main + self.pool(x))
