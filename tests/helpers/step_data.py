"""The engine's ``StepData`` over a fixed list of batches (one process, CPU), for the tests of the
methods that see a step's batches (``prepare_step``, ``after_training``)."""

from __future__ import annotations

from contextlib import nullcontext

import torch


class FakeData:
    """``batches``: ``(images, labels)`` pairs returned for every epoch; ``batches_per_epoch``:
    what the method is told (default: their number)."""

    def __init__(self, batches, lr=0.01, batches_per_epoch=None):
        self._batches = batches
        self.device = torch.device("cpu")
        self.epochs = 1
        self.batches_per_epoch = len(batches) if batches_per_epoch is None else batches_per_epoch
        self.sgd_settings = {
            "lr": lr,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 1e-4,
            "lr_power": 0.9,
        }

    def batches(self, epoch):
        return iter(self._batches)

    def autocast(self):
        return nullcontext()

    def sum_over_processes(self, tensor):
        return tensor

    def mean_over_processes(self, tensor):
        return tensor
