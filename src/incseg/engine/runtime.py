"""Where and how this process computes: device, process identity, precision, memory format,
synchronised batch norm and compilation. The engine reads these from a :class:`Runtime`, never
from the config."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from incseg.config import Config
from incseg.engine.distributed import (
    SINGLE,
    DistInfo,
    convert_sync_bn,
    local_batch_size,
    local_device,
)
from incseg.errors import ConfigError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``train.device``: ``auto`` is CUDA when available, else the CPU.

    Raises:
        ConfigError: ``cuda`` on a machine where PyTorch finds no CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device: cuda, but PyTorch finds no CUDA device on this machine "
            "(torch.cuda.is_available() is False); use auto or cpu"
        )
    return torch.device(name)


@dataclass(frozen=True)
class Runtime:
    """One value handed to training and evaluation instead of loose arguments.

    ``dist`` is this process's identity (the only one the engine consults); ``progress`` shows
    progress bars (rank 0 only); ``amp_dtype`` is None for float32; ``sync_bn`` synchronises
    batch norm over the processes (only with several); ``compile`` wraps the training forward
    in ``torch.compile``.
    """

    device: torch.device
    dist: DistInfo = SINGLE
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    progress: bool = False
    sync_bn: bool = True
    compile: bool = False

    @classmethod
    def of(cls, config: Config, dist: DistInfo = SINGLE, *, progress: bool = False) -> Runtime:
        """The runtime ``config.train`` asks for in process ``dist``.

        Raises:
            ConfigError: ``train.batch_size`` does not split evenly over the processes.
        """
        train = config.train
        local_batch_size(train.batch_size, dist.world_size)
        return cls(
            local_device(resolve_device(train.device)),
            dist,
            AMP_DTYPES[train.amp],
            train.channels_last,
            progress and dist.is_main,
            train.sync_bn,
            train.compile,
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

    def place(self, model: nn.Module) -> nn.Module:
        """Move to the device (channels-last if asked) and synchronise batch norm across
        processes."""
        if self.dist.distributed and self.sync_bn:
            convert_sync_bn(model, self.device)
        return model.to(self.device, memory_format=self.memory_format)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module that runs the training forward pass: ``model`` itself, or its DDP wrapper
        (several processes), compiled when asked. Parameters stay shared with ``model``."""
        net: nn.Module = model
        if self.dist.distributed:
            net = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.compile:
            net = torch.compile(net)
        return net
