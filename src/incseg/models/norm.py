"""Normalisation + activation pairs.

``iabn`` is the functional equivalent of In-Place ABN with leaky ReLU (slope 0.01) used by the MiB
paper: a BatchNorm followed by LeakyReLU(0.01), without the in-place memory trick (docs/protocol.md, "Model").
"""

from __future__ import annotations

from torch import nn

from incseg.errors import ConfigError
from incseg.models.choices import NORMS


def activation(norm: str) -> nn.Module:
    """The activation that goes with ``norm``."""
    if norm == "bn":
        return nn.ReLU(inplace=True)
    if norm == "iabn":
        return nn.LeakyReLU(0.01, inplace=True)
    raise ConfigError(f"unknown norm {norm!r}; expected one of {list(NORMS)}")


def norm_act(channels: int, norm: str) -> nn.Sequential:
    """BatchNorm2d(channels) followed by the activation of ``norm``."""
    return nn.Sequential(nn.BatchNorm2d(channels), activation(norm))
