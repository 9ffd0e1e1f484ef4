"""Where and how this process computes: device, process identity, precision, memory format."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from incseg.config import Config
from incseg.engine.distributed import SINGLE, DistInfo, local_device

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``train.device``: ``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Runtime:
    """One value handed to training and evaluation instead of five loose arguments.

    ``dist`` is this process's identity (the only one the engine consults); ``progress`` shows
    progress bars (rank 0 only); ``amp_dtype`` is None for float32.
    """

    device: torch.device
    dist: DistInfo = SINGLE
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    progress: bool = False

    @classmethod
    def of(cls, config: Config, dist: DistInfo = SINGLE, *, progress: bool = False) -> Runtime:
        device = local_device(resolve_device(config.train.device))
        return cls(
            device,
            dist,
            AMP_DTYPES[config.train.amp],
            config.train.channels_last,
            progress and dist.is_main,
        )

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> AbstractContextManager:
        """Mixed precision when ``train.amp`` asks for it, else a no-op context."""
        return torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        )
