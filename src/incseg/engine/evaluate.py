"""Evaluation: one confusion matrix over all test pixels of the seen classes."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from incseg.engine.distributed import all_reduce_sum
from incseg.metrics import confusion_matrix


def predict_channels(logits: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` logits -> ``(B, H, W)`` int64 index of the highest channel (first on ties).

    ``max(1).indices`` gives exactly ``argmax(1)`` (both return the first maximal index) but on
    contiguous CPU logits it is ~4-20x faster: argmax reduces over the strided channel dimension
    with a slow generic kernel (docs/benchmarks.md, ``prediction_*`` figures). The official MiB code
    predicts with ``max`` as well (fcdl94/MiB ``train.py`` line 233, ``outputs.max(dim=1)``).
    """
    return logits.max(1).indices


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    num_classes: int,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """Return the ``(K, K)`` int64 confusion matrix of ``model`` on ``loader``.

    The matrix stays on ``device`` while batches accumulate (no host copy per batch). Under
    ``torchrun`` each rank evaluates its own shard of the images (``build_test_loader``) and the
    matrices are summed over ranks here, so every rank returns the matrix of the whole test set.
    """
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images).logits
        matrix += confusion_matrix(predict_channels(logits), targets, num_classes)
    return all_reduce_sum(matrix)
