"""Confusion matrix, IoU and the old / new / all report (docs/protocol.md, "Metric").

One confusion matrix accumulates over all test pixels (label 255 excluded); IoU is per class and
mIoU averages the classes that have ground-truth pixels, as the official metric does
(fcdl94/MiB ``metrics/stream_metrics.py:83-91``). Never per-image averaged.

Two groupings are reported, named apart:

- the paper's (MiB, Cermelli et al. CVPR 2020, Tables 1-4): background excluded from every
  group. VOC 15-5: old = classes 1-15, new = 16-20, all = 1-20, so that
  all = (15 old + 5 new) / 20 when every class has ground truth;
- ``miou_with_bg``: the mean over every class, background included (VOC: 0-20), which
  cssegmentation's model zoo (the seed table) and PLOP report as "mIoU".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from incseg.protocol.steps import StepInfo

GROUPING = (
    "miou_old / miou_new / miou_all: the MiB paper's grouping, background excluded (VOC 15-5: "
    "classes 1-15 / 16-20 / 1-20); miou_with_bg: every class, background included (VOC 0-20), "
    "as cssegmentation and PLOP report mIoU"
)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confusion matrix of one batch.

    Args:
        pred: ``(...)`` integer predicted channels in ``0..num_classes-1``.
        target: same shape, integer ground-truth channels; 255 (or any value >= num_classes)
            is ignored.
        num_classes: K.

    Returns:
        ``(K, K)`` int64 matrix on ``pred``'s device; rows = ground truth, columns = prediction.
    """
    k = num_classes
    bins = k * k
    target = target.reshape(-1)
    if target.dtype != torch.uint8:  # uint8 targets are <= 255 already; others could overflow
        target = torch.where((target < 0) | (target >= k), k, target)
    # code = target * K + pred: every ignored target (>= K) lands at or beyond bin K*K, so the
    # ignored pixels need no mask (boolean indexing costs a copy on the CPU and a device sync on
    # the GPU) and no select; the first K*K bins are the matrix. Codes are at most 255*K + K-1.
    if pred.device.type == "cpu":
        # int16 halves the memory traffic and bincount's input; in-place ops of one dtype
        # avoid temporaries (about 2.5x NumPy's per-image bincount; benchmarks/).
        dtype = torch.int16 if 256 * k < 2**15 else torch.int32
        code = target.to(dtype).mul_(k).add_(pred.reshape(-1).to(dtype))
        counts = torch.bincount(code, minlength=bins)
    else:
        counts = _fixed_bin_counts(target.long() * k + pred.reshape(-1), k)
    return counts[:bins].reshape(num_classes, num_classes)


def _fixed_bin_counts(code: torch.Tensor, k: int) -> torch.Tensor:
    """Counts of ``code`` (int64, values < 256 * k) in ``256 * k`` bins. Unlike ``bincount``, whose
    output size depends on the data (a device-to-host sync on GPUs), the size is fixed, so a GPU
    evaluation never waits on the host per batch."""
    counts = torch.zeros(256 * k, dtype=torch.int64, device=code.device)
    return counts.index_add_(
        0, code, torch.ones(1, dtype=torch.int64, device=code.device).expand(code.numel())
    )


def iou_per_class(matrix: torch.Tensor) -> torch.Tensor:
    """``(K,)`` float64 IoU; NaN for classes with no ground truth and no prediction."""
    matrix = matrix.double()
    tp = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def _mean_present(iou: torch.Tensor, present: torch.Tensor) -> float:
    values = iou[present]
    return float(values.mean()) if len(values) else float("nan")


@dataclass(frozen=True)
class StepReport:
    """Evaluation of one step.

    Attributes:
        step: step index.
        class_names: name per channel.
        iou: IoU per channel (NaN where the class has no pixels at all).
        present: per channel, whether it has ground-truth pixels in the test set.
        num_base_channels: channels of step 0 (background and the base classes).
        pixel_accuracy: fraction of valid pixels predicted correctly.
        abstained: for a model with a "no prediction" output (SimCIS), the fraction of labelled
            pixels it left without a class, which the IoU leaves out; ``None`` otherwise.
    """

    step: int
    class_names: tuple[str, ...]
    iou: tuple[float, ...]
    present: tuple[bool, ...]
    num_base_channels: int
    pixel_accuracy: float
    abstained: float | None = None

    @classmethod
    def from_confusion(cls, matrix: torch.Tensor, info: StepInfo) -> StepReport:
        """``matrix``: ``(K, K)`` (rows ground truth, columns prediction) or ``(K, K + 1)``, the
        last column the labelled pixels of each class that got no prediction
        (:func:`incseg.engine.evaluate.evaluate`)."""
        matrix = matrix.cpu()
        abstained = None
        if matrix.shape[1] == matrix.shape[0] + 1:
            abstained = float(matrix[:, -1].sum() / matrix.sum().clamp(min=1))
            matrix = matrix[:, :-1]
        total = matrix.sum().clamp(min=1)
        return cls(
            abstained=abstained,
            step=info.step,
            class_names=info.class_names,
            iou=tuple(iou_per_class(matrix).tolist()),
            present=tuple((matrix.sum(1) > 0).tolist()),
            num_base_channels=info.num_base_channels,
            pixel_accuracy=float(matrix.diag().sum() / total),
        )

    def _mean(self, start: int, stop: int) -> float:
        iou = torch.tensor(self.iou[start:stop], dtype=torch.float64)
        return _mean_present(iou, torch.tensor(self.present[start:stop], dtype=torch.bool))

    @property
    def miou_old(self) -> float:
        """Paper grouping: mIoU of the step-0 classes without background (15-5: "1-15")."""
        return self._mean(1, self.num_base_channels)

    @property
    def miou_new(self) -> float:
        """mIoU of classes added after step 0 (NaN at step 0)."""
        return self._mean(self.num_base_channels, len(self.iou))

    @property
    def miou_all(self) -> float:
        """Paper grouping: mIoU of every class seen so far without background (15-5: "1-20")."""
        return self._mean(1, len(self.iou))

    @property
    def miou_with_bg(self) -> float:
        """mIoU of every class seen so far, background included (15-5: 0-20), the seed's "mIoU"."""
        return self._mean(0, len(self.iou))

    @property
    def old_range(self) -> str:
        return f"1-{self.num_base_channels - 1}"

    @property
    def all_range(self) -> str:
        return f"1-{len(self.iou) - 1}"

    @property
    def with_bg_range(self) -> str:
        return f"0-{len(self.iou) - 1}"

    @property
    def new_range(self) -> str:
        last = len(self.iou) - 1
        return f"{self.num_base_channels}-{last}" if last >= self.num_base_channels else "none"

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "miou_old": self.miou_old,
            "miou_new": self.miou_new,
            "miou_all": self.miou_all,
            "miou_with_bg": self.miou_with_bg,
            "pixel_accuracy": self.pixel_accuracy,
            **({} if self.abstained is None else {"abstained": self.abstained}),
            "per_class": {
                name: (iou if present else None)
                for name, iou, present in zip(self.class_names, self.iou, self.present, strict=True)
            },
        }
