"""Confusion matrix against a naive loop; IoU and the old / new / all split."""

import math

import numpy as np
import pytest
import torch

from incseg.metrics import StepReport, confusion_matrix, iou_per_class
from incseg.protocol import get_setting, step_info


def test_confusion_matrix_matches_naive_loop():
    gen = torch.Generator().manual_seed(0)
    num = 7
    target = torch.randint(0, num, (3, 11, 13), generator=gen)
    target[torch.rand(target.shape, generator=gen) < 0.2] = 255
    pred = torch.randint(0, num, (3, 11, 13), generator=gen)
    naive = torch.zeros(num, num, dtype=torch.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            naive[t, p] += 1
    assert torch.equal(confusion_matrix(pred, target, num), naive)


def test_iou_per_class_and_missing_classes():
    matrix = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    iou = iou_per_class(matrix)
    assert iou[0].item() == pytest.approx(3 / 4)
    assert iou[1].item() == pytest.approx(2 / 3)
    assert math.isnan(iou[2].item())


def test_report_old_new_all_average_classes_with_ground_truth():
    info = step_info(get_setting("voc", "19-1"), 1)  # 20 base channels + 1 new
    matrix = torch.zeros(21, 21, dtype=torch.int64)
    matrix[0, 0] = 8
    matrix[0, 20] = 2  # background predicted as the new class
    matrix[1, 1] = 5
    matrix[20, 20] = 2
    matrix[20, 1] = 2
    matrix[3, 3] = 0  # class 3 never appears: no ground truth, not averaged
    matrix[5, 4] = 1  # bottle never right: IoU 0; boat has no ground truth but a prediction
    report = StepReport.from_confusion(matrix, info)
    iou_bg, iou_aero, iou_bottle = 8 / 10, 5 / 7, 0.0
    assert report.miou_old == pytest.approx((iou_aero + iou_bottle) / 2)  # background excluded
    assert report.miou_new == pytest.approx(2 / 6)
    assert report.miou_all == pytest.approx((iou_aero + iou_bottle + 2 / 6) / 3)
    assert report.miou_with_bg == pytest.approx((iou_bg + iou_aero + iou_bottle + 2 / 6) / 4)
    assert (report.old_range, report.new_range, report.all_range, report.with_bg_range) == (
        "1-19",
        "20-20",
        "1-20",
        "0-20",
    )
    assert report.to_dict()["miou_with_bg"] == report.miou_with_bg
    assert report.to_dict()["per_class"]["boat"] is None
    assert report.to_dict()["per_class"]["tvmonitor"] == pytest.approx(2 / 6)
    assert report.pixel_accuracy == pytest.approx(15 / 20)


def test_paper_grouping_on_a_worked_15_5_example():
    """Every class has ground truth: the paper's all = (15 old + 5 new) / 20 exactly, and the
    background only enters the with-background mean (21 classes)."""
    info = step_info(get_setting("voc", "15-5"), 1)
    matrix = torch.zeros(21, 21, dtype=torch.int64)
    for k in range(21):  # class k: 10 pixels right, k % 4 taken for the next class
        matrix[k, k] = 10
        matrix[k, (k + 1) % 21] = k % 4
    report = StepReport.from_confusion(matrix, info)
    iou = [
        10 / (10 + matrix[k].sum().item() - 10 + matrix[:, k].sum().item() - 10) for k in range(21)
    ]
    old, new = sum(iou[1:16]) / 15, sum(iou[16:21]) / 5
    assert report.miou_old == pytest.approx(old) and report.miou_new == pytest.approx(new)
    assert report.miou_all == pytest.approx((15 * old + 5 * new) / 20)
    assert report.miou_with_bg == pytest.approx((iou[0] + 15 * old + 5 * new) / 21)
    assert report.miou_all != pytest.approx(report.miou_with_bg)
    assert (report.old_range, report.new_range, report.all_range) == ("1-15", "16-20", "1-20")


@pytest.mark.parametrize("num_classes", [3, 21, 151])  # 151 (ADE) takes the int32 code path
@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int64])
def test_confusion_matrix_matches_a_numpy_reference(num_classes, target_dtype):
    gen = torch.Generator().manual_seed(num_classes)
    pred = torch.randint(0, num_classes, (3, 17, 19), generator=gen)
    target = torch.randint(0, num_classes, (3, 17, 19), generator=gen)
    target[0, :5] = 255
    target[1, :, :3] = num_classes  # >= K: ignored as well
    if target_dtype == torch.int64:
        target[2, 0] = -1
        target[2, 1] = 70_000  # would overflow a 16-bit code
    t, p = target.numpy().ravel(), pred.numpy().ravel()
    keep = (t >= 0) & (t < num_classes)
    expected = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(expected, (t[keep], p[keep]), 1)
    got = confusion_matrix(
        pred, target.to(target_dtype) if target_dtype == torch.uint8 else target, num_classes
    )
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expected)


def test_fixed_bin_counts_used_on_gpus_match_bincount():
    from incseg.metrics import _fixed_bin_counts

    gen = torch.Generator().manual_seed(3)
    code = torch.randint(0, 256 * 21, (5000,), generator=gen)
    counts = _fixed_bin_counts(code, 21)
    assert counts.shape == (256 * 21,) and counts.dtype == torch.int64
    assert torch.equal(counts, torch.bincount(code, minlength=256 * 21))
