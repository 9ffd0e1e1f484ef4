"""Evaluation: one confusion matrix over all test pixels of the seen classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from incseg.data import build_source
from incseg.engine.distributed import SINGLE, DistInfo, all_reduce_sum
from incseg.engine.loaders import build_test_loader
from incseg.engine.model_io import restore_step
from incseg.engine.runtime import Runtime
from incseg.metrics import StepReport, confusion_matrix
from incseg.protocol.choices import IGNORE_INDEX


def predict_channels(logits: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` logits -> ``(B, H, W)`` int64 index of the highest channel (first on ties).

    ``max(1).indices`` gives exactly ``argmax(1)`` (both return the first maximal index) but on
    contiguous CPU logits it is ~4-20x faster: argmax reduces over the strided channel dimension
    with a slow generic kernel (docs/benchmarks.md, ``prediction_*`` figures). The official MiB code
    predicts with ``max`` as well (fcdl94/MiB ``train.py`` line 233, ``outputs.max(dim=1)``).
    """
    return logits.max(1).indices


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, rt: Runtime) -> torch.Tensor:
    """Return the ``(K, K)`` int64 confusion matrix of ``model`` on ``loader`` (rows ground
    truth, columns prediction), ``(K, K + 1)`` for a model that abstains.

    Scores of another size than the labels are upsampled bilinearly to them first. Scores with
    one channel more than ``num_classes`` end with "no prediction" (SimCIS's void): its pixels
    are left out of the ``K x K`` part, as SimCIS's evaluator leaves out void predictions
    (SooLab/SimCIS ``continual/evaluator.py:79-82, 114-116``), and counted per ground-truth
    class in the extra last column, so that the report says how much was left out. The matrix
    stays on the device while batches accumulate (no host copy per batch). Under
    ``torchrun`` each rank evaluates its own shard of the images (``build_test_loader``) and the
    matrices are summed over ranks here, so every rank returns the matrix of the whole test set.
    """
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=rt.device)
    # per class, labelled pixels without a prediction; made before any batch for SimCIS's
    # inference, so that a rank without test images sums a matrix of the same shape
    abstains = getattr(getattr(model, "module", model), "inference", None) == "simcis"
    abstained = torch.zeros(num_classes, dtype=torch.int64, device=rt.device) if abstains else None
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not rt.progress):
        images = images.to(rt.device, non_blocking=True, memory_format=rt.memory_format)
        targets = targets.to(rt.device, non_blocking=True)
        with rt.autocast():
            scores = model.prediction_scores(model(images))
        if scores.shape[-2:] != targets.shape[-2:]:
            # labels kept at their size (data.pipeline: mask2former): the scores are upsampled
            # to them as Mask2Former's sem_seg_postprocess does (maskformer_model.py)
            scores = F.interpolate(
                scores.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False
            )
        pred = predict_channels(scores)
        if scores.shape[1] == num_classes + 1:  # the model's "no prediction" channel (SimCIS)
            missed = targets[(pred == num_classes) & (targets < num_classes)].long()
            counts = torch.bincount(missed, minlength=num_classes)
            abstained = counts if abstained is None else abstained + counts
            targets = torch.where(pred == num_classes, IGNORE_INDEX, targets)
        matrix += confusion_matrix(pred, targets, num_classes)
    if abstained is not None:
        matrix = torch.cat([matrix, abstained[:, None]], dim=1)
    return all_reduce_sum(matrix, rt.dist)


def evaluate_checkpoint(
    checkpoint: dict, *, progress: bool = False, dist: DistInfo = SINGLE
) -> tuple[StepReport, int]:
    """Re-evaluate a saved step on its test set, exactly as at the end of training (the run's
    device, precision and memory format: channels-last convolutions round differently). Returns
    the report and the number of test images."""
    config, info, model = restore_step(checkpoint)
    rt = Runtime.of(config, dist, progress=progress)
    source = build_source(config.data, "test", progress=rt.progress)
    loader = build_test_loader(config, source, source.presence(), info, dist=dist)
    matrix = evaluate(rt.place(model), loader, info.num_channels, rt)
    return StepReport.from_confusion(matrix, info), len(loader.dataset)
