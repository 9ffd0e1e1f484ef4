"""PLOP's formulas on hand-computed tensors (arthurdouillard/CVPR2021_PLOP ``train.py``)."""

from __future__ import annotations

import math

import pytest
import torch

from incseg.errors import ConfigError
from incseg.losses import (
    local_pod,
    local_pod_embedding,
    merge_new_logits,
    pixel_mean_cross_entropy,
    pod_distance,
)
from incseg.methods.plop import (
    PLOP,
    entropy_histogram,
    max_entropy,
    median_thresholds,
    plop_entropy,
    pseudo_label,
)
from incseg.protocol import get_setting, step_info


def test_local_pod_embedding_of_a_known_map_at_each_scale():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    emb = local_pod_embedding(x)
    # scale 1 (one 4x4 region): row means, then column means
    scale1 = [1.5, 5.5, 9.5, 13.5, 6.0, 7.0, 8.0, 9.0]
    # scale 2 (2x2 regions, row-major): [row means, column means] per region
    scale2 = [0.5, 4.5, 2.0, 3.0, 2.5, 6.5, 4.0, 5.0, 8.5, 12.5, 10.0, 11.0, 10.5, 14.5, 12.0, 13.0]
    # scale 4 (1x1 regions): each pixel twice
    scale4 = [v for v in range(16) for _ in range(2)]
    assert emb.shape == (1, 56)
    assert emb[0].tolist() == scale1 + scale2 + scale4
    two_channels = local_pod_embedding(torch.stack([x[0, 0], -x[0, 0]])[None], scales=(1,))
    assert two_channels[0].tolist() == [
        1.5,
        5.5,
        9.5,
        13.5,
        -1.5,
        -5.5,
        -9.5,
        -13.5,
        6.0,
        7.0,
        8.0,
        9.0,
        -6.0,
        -7.0,
        -8.0,
        -9.0,
    ]


def test_local_pod_embedding_refuses_maps_smaller_than_its_finest_grid():
    with pytest.raises(ConfigError, match="at least 4 wide.*data.crop_size"):
        local_pod_embedding(torch.zeros(1, 1, 2, 2))


def test_pod_distance_of_two_known_maps():
    old = torch.ones(2, 1, 4, 4)
    new = torch.stack([2 * torch.ones(1, 4, 4), torch.ones(1, 4, 4)])
    # image 0: squared maps 1 vs 4, all 56 entries differ by 3; image 1: identical
    assert pod_distance(old, new).item() == pytest.approx((3 * math.sqrt(56) + 0) / 2)
    # the sign of the maps does not matter (they are squared first)
    assert pod_distance(old, -new).item() == pytest.approx(pod_distance(old, new).item())


def test_merge_new_logits_adds_the_new_channels_to_background():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).reshape(1, 5, 1, 1)  # O = 3 old channels
    assert merge_new_logits(logits, 3).flatten().tolist() == [1.0 + 4.0 + 5.0, 2.0, 3.0]


def test_local_pod_weights_each_map_and_divides_by_their_number():
    feat_old, feat_new = torch.ones(1, 1, 4, 4), 2 * torch.ones(1, 1, 4, 4)
    old_logits = torch.ones(1, 2, 4, 4)  # O = 2
    new_logits = torch.cat([torch.ones(1, 2, 4, 4), torch.ones(1, 1, 4, 4)], 1)  # bg 1 + 1 = 2
    schedule = math.sqrt(3 / 1)
    loss = local_pod([feat_old, old_logits], [feat_new, new_logits], [0.01, 0.0005], schedule)
    # features: 3 sqrt(56); logits: only the background channel's 56 of 112 entries differ, by 3
    expected = (0.01 * schedule * 3 * math.sqrt(56) + 0.0005 * schedule * 3 * math.sqrt(56)) / 2
    assert loss.item() == pytest.approx(expected)
    skipped = local_pod([feat_old, old_logits], [feat_new, new_logits], [0.0, 0.0005], schedule)
    assert skipped.item() == pytest.approx(0.0005 * schedule * 3 * math.sqrt(56) / 2)


def test_plop_entropy_is_a_channel_mean_normalised_by_log_o():
    uniform = torch.full((1, 4, 1, 1), 0.25)
    assert plop_entropy(uniform).item() == pytest.approx(0.25)  # -(1/log 4) * 0.25 * log 0.25
    one_hot = torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(1, 4, 1, 1)
    assert abs(plop_entropy(one_hot).item()) < 1e-8
    assert max_entropy(21).item() == pytest.approx(math.log(21))


def _probs(*pixels):
    """``(1, O, 1, N)`` probabilities from N per-pixel distributions."""
    return torch.tensor(pixels).T.reshape(1, len(pixels[0]), 1, len(pixels))


def test_entropy_histogram_counts_background_pixels_by_class_and_bin():
    probs = _probs([0.5, 0.5], [0.0, 1.0], [0.0, 1.0], [0.5, 0.5])
    targets = torch.tensor([[[0, 0, 2, 255]]])  # the last two pixels are not background
    hist = entropy_histogram(probs, targets, num_classes=4, bins=100)
    assert hist.shape == (4, 100) and hist.dtype == torch.long and hist.sum() == 2
    # uniform over 2: entropy 0.5, / log 4 = 0.3607 -> bin 36, class 0 (first maximum)
    assert hist[0, 36] == 1
    assert hist[1, 0] == 1  # certain class 1: entropy ~0 -> bin 0


def test_median_thresholds_published_and_corrected():
    hist = torch.zeros(3, 4, dtype=torch.long)
    hist[0] = torch.tensor([6, 2, 0, 0])  # half = 4 inside bin 0: both rules give 4/6 of a bin
    hist[1] = torch.tensor([1, 5, 2, 0])  # half = 4
    # class 2 never predicted -> the floor
    published = median_thresholds(hist, floor=0.001, rule="published")
    corrected = median_thresholds(hist, floor=0.001, rule="corrected")
    assert published[0].item() == pytest.approx(0.25 * 4 / 6)
    assert corrected[0].item() == pytest.approx(0.25 * 4 / 6)
    # published: the running sum skips bin 0's count (it adds the index 0): 0.25 + 4/5 * 0.25
    assert published[1].item() == pytest.approx(0.45)
    assert corrected[1].item() == pytest.approx(0.25 + 3 / 5 * 0.25)  # 1 pixel before bin 1
    assert published[2].item() == corrected[2].item() == pytest.approx(0.001)
    assert median_thresholds(torch.zeros(1, 4, dtype=torch.long), floor=0.3)[
        0
    ].item() == pytest.approx(0.3)


def test_published_median_reads_the_bin_floating_point_rounds_to():
    assert int((29 / 100) * 100) == 28  # the rounding the published code inherits
    hist = torch.zeros(1, 100, dtype=torch.long)
    hist[0, 28], hist[0, 29] = 100, 900  # half = 500
    # published: no break up to k = 28 (running 378 + 100 < 500); at k = 29 the running sum of
    # indices is 406 and the bin read is 28 again: 0.29 + (500 - 406) / 100 / 100
    assert median_thresholds(hist, 0.001)[0].item() == pytest.approx(
        0.29 + 94 / 100 / 100, abs=1e-6
    )
    # corrected: 100 pixels before bin 29 of 900
    assert median_thresholds(hist, 0.001, "corrected")[0].item() == pytest.approx(
        0.29 + 400 / 900 / 100
    )


def test_pseudo_labels_and_adaptive_factor():
    # O = 2 (background, class 1), C_t = 3; pixels: certain class 1, uncertain, new class, void
    probs = _probs([0.0, 1.0], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0])
    targets = torch.tensor([[[0, 0, 2, 255]]])
    thresholds = torch.tensor([0.3, 0.3, 0.001])
    labels, factor = pseudo_label(probs, targets, thresholds, max_entropy(3), num_old=2)
    # uncertain: entropy 0.5 / log 3 = 0.455 >= 0.3 -> 255
    assert labels.tolist() == [[[1, 255, 2, 255]]]
    assert factor.shape == (1, 1, 1)
    assert factor.item() == pytest.approx(1 / (2 + 1e-6))  # one of two background pixels kept
    low = pseudo_label(probs, targets, torch.tensor([0.5, 0.5, 0.5]), max_entropy(3), 2)
    assert low[0].tolist() == [[[1, 0, 2, 255]]] and low[1].item() == pytest.approx(1.0, abs=1e-5)


def test_pixel_mean_cross_entropy_averages_over_all_pixels_with_weights():
    logits = torch.zeros(2, 2, 1, 2)  # CE = log 2 everywhere
    targets = torch.tensor([[[0, 255]], [[1, 1]]])
    weights = torch.tensor([0.5, 1.0]).reshape(2, 1, 1)
    # image 0: (0.5 log 2 + 0) ; image 1: 2 log 2 ; over 4 pixels
    expected = (0.5 * math.log(2) + 2 * math.log(2)) / 4
    assert pixel_mean_cross_entropy(logits, targets, weights).item() == pytest.approx(expected)


def _setting_step1():
    return step_info(get_setting("voc", "15-5"), 1)


def test_plop_relabel_and_losses_on_a_step_one_batch():
    info = _setting_step1()  # 16 old channels, 5 new
    method = PLOP()
    torch.manual_seed(0)
    old_logits = torch.randn(2, 16, 8, 8)
    targets = torch.zeros(2, 8, 8, dtype=torch.long)
    targets[:, :2] = 17
    from incseg.models.segmenter import SegmenterOutput

    maps = {
        name: torch.randn(2, 4, 8, 8) for name in ("stage1", "stage2", "stage3", "stage4", "head")
    }
    old = SegmenterOutput(old_logits, {**maps, "logits_small": old_logits})
    method.begin_step(info, None)
    method.end_scan(method.scan(old, targets, info), info)
    assert method.thresholds.shape == (21,) and (method.thresholds >= 0.001).all()
    relabelled = method.relabel(old, targets, info)
    probs = torch.softmax(old_logits, 1)
    expected, factor = pseudo_label(probs, targets, method.thresholds, max_entropy(21), 16)
    assert torch.equal(relabelled.labels, expected) and torch.equal(relabelled.weights, factor)
    new_logits = torch.randn(2, 21, 8, 8)
    new = SegmenterOutput(new_logits, {**maps, "logits_small": new_logits})
    terms = method.losses(new, old, relabelled, info)
    assert terms["ce"].item() == pytest.approx(
        pixel_mean_cross_entropy(new_logits, expected, factor).item()
    )
    # same stage maps: only the logits' term remains, / 6 maps
    pod = (
        0.0005 * math.sqrt(21 / 5) * pod_distance(old_logits, merge_new_logits(new_logits, 16)) / 6
    )
    assert terms["pod"].item() == pytest.approx(pod.item())
    assert set(method.step_state_dict()) == {"thresholds"}


def test_plop_rejects_unknown_choices():
    from incseg.config import config_from_dict

    with pytest.raises(ConfigError, match=r"method.median: unknown value 'exact'.*'published'"):
        config_from_dict({"method": {"name": "plop", "median": "exact"}})
    with pytest.raises(ConfigError, match=r"method.init: unknown value 'zeros'.*'balanced'"):
        config_from_dict({"method": {"name": "plop", "init": "zeros"}})
