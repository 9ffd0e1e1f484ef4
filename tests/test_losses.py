"""Golden and invariant tests of the MiB losses (SPEC section 5)."""

import math

import pytest
import torch
import torch.nn.functional as F

from incseg.losses import cross_entropy, unbiased_cross_entropy, unbiased_knowledge_distillation


def _pixel(values):
    """One pixel: (1, C, 1, 1) logits."""
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1)


def test_unce_worked_example_new_target():
    loss = unbiased_cross_entropy(_pixel([2, 0, 1, 3]), torch.tensor([[[3]]]), num_old=3)
    assert loss.item() == pytest.approx(0.440190, abs=1e-6)


def test_unce_worked_example_old_target_counts_as_background():
    loss = unbiased_cross_entropy(_pixel([2, 0, 1, 3]), torch.tensor([[[1]]]), num_old=3)
    assert loss.item() == pytest.approx(1.032584, abs=1e-6)
    # target 0 (background) gives the same value: old classes are absorbed into background
    same = unbiased_cross_entropy(_pixel([2, 0, 1, 3]), torch.tensor([[[0]]]), num_old=3)
    assert same.item() == pytest.approx(1.032584, abs=1e-6)


@pytest.mark.parametrize("num_old", [0, 1])
def test_unce_without_old_classes_is_cross_entropy(num_old):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 3, generator=gen)
    targets = torch.randint(0, 5, (2, 4, 3), generator=gen)
    targets[0, 0, 0] = 255
    expected = F.cross_entropy(logits, targets, ignore_index=255)
    assert torch.allclose(unbiased_cross_entropy(logits, targets, num_old), expected)


def test_unce_with_one_old_channel_equals_ce_on_remaining_channels():
    # O = 1 means only background is old: UNCE reduces to CE (log p(bg) = z_0 - D).
    logits = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[[0, 1], [2, 3]]])
    assert torch.allclose(
        unbiased_cross_entropy(logits, targets, 1), cross_entropy(logits, targets)
    )


def test_ignored_pixels_contribute_nothing():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 6, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 6, (1, 3, 4), generator=gen)
    targets[0, 1, :] = 255
    loss = unbiased_cross_entropy(logits, targets, num_old=3)
    # same as the loss over the kept pixels only
    keep = targets != 255
    flat_logits = logits.detach().permute(0, 2, 3, 1)[keep].T.reshape(1, 6, -1, 1)
    flat_targets = targets[keep].reshape(1, -1, 1)
    assert loss.item() == pytest.approx(unbiased_cross_entropy(flat_logits, flat_targets, 3).item())
    loss.backward()
    assert torch.all(logits.grad[0, :, 1, :] == 0)
    assert torch.any(logits.grad[0, :, 0, :] != 0)


def test_unce_does_not_modify_targets():
    targets = torch.tensor([[[1, 4], [255, 0]]])
    before = targets.clone()
    unbiased_cross_entropy(torch.randn(1, 5, 2, 2), targets, num_old=3)
    assert torch.equal(targets, before)


def test_unkd_hand_computed():
    # New model: 4 channels (bg, old1, old2, new); old model: 3 channels.
    z = [0.5, 1.0, -1.0, 2.0]
    y = [1.0, 0.0, 2.0]
    denom = math.log(sum(math.exp(v) for v in z))
    log_bg = math.log(math.exp(z[0]) + math.exp(z[3])) - denom
    log_p = [log_bg, z[1] - denom, z[2] - denom]
    ysum = sum(math.exp(v) for v in y)
    q = [math.exp(v) / ysum for v in y]
    expected = -sum(qc * lp for qc, lp in zip(q, log_p)) / 3
    loss = unbiased_knowledge_distillation(_pixel(z), _pixel(y))
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(0.843881, abs=1e-6)  # worked by hand: -(1/3) sum q log p


def test_unkd_alpha_scales_old_logits_and_averages_all_pixels():
    z = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(
        unbiased_knowledge_distillation(z, y, alpha=2.0), unbiased_knowledge_distillation(z, 2 * y)
    )
    per_pixel = [
        unbiased_knowledge_distillation(
            z[b : b + 1, :, i : i + 1, j : j + 1], y[b : b + 1, :, i : i + 1, j : j + 1]
        )
        for b in range(2)
        for i in range(3)
        for j in range(3)
    ]
    assert unbiased_knowledge_distillation(z, y).item() == pytest.approx(
        torch.stack(per_pixel).mean().item()
    )


def test_gradients_equal_the_hand_derived_formulas():
    """d/dz of UNCE and UNKD worked out by hand, per pixel, then averaged as the losses average.

    UNCE, target c (mean over the P non-void pixels): new c: (softmax - onehot_c) / P; background or
    old: (softmax - 1[k < O] softmax / sum_{j<O} softmax_j) / P.
    UNKD (mean over all N pixels and the O channels): (softmax - q_0 1[k in B] softmax / p_B
    - 1[1 <= k < O] q_k) / (O N), with B = {0} + new channels and p_B their total probability."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 5, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    old = torch.randn(1, 3, 2, 2, generator=gen, dtype=torch.float64)
    targets = torch.tensor([[[0, 4], [2, 255]]])
    num_old = 3
    (grad,) = torch.autograd.grad(unbiased_cross_entropy(logits, targets, num_old), logits)
    p = torch.softmax(logits.detach(), 1)
    expected = torch.zeros_like(p)
    valid = [(i, j) for i in range(2) for j in range(2) if targets[0, i, j] != 255]
    for i, j in valid:
        c, pix = int(targets[0, i, j]), p[0, :, i, j]
        if c >= num_old:
            expected[0, :, i, j] = pix - F.one_hot(torch.tensor(c), 5).double()
        else:
            share = torch.zeros(5, dtype=torch.float64)
            share[:num_old] = pix[:num_old] / pix[:num_old].sum()
            expected[0, :, i, j] = pix - share
    torch.testing.assert_close(grad, expected / len(valid))
    (grad,) = torch.autograd.grad(unbiased_knowledge_distillation(logits, old), logits)
    q = torch.softmax(old, 1)
    expected = torch.zeros_like(p)
    for i in range(2):
        for j in range(2):
            pix, soft = p[0, :, i, j], q[0, :, i, j]
            in_b = torch.tensor([1.0, 0, 0, 1, 1], dtype=torch.float64)
            old_part = torch.cat(
                [torch.zeros(1, dtype=torch.float64), soft[1:], torch.zeros(2, dtype=torch.float64)]
            )
            expected[0, :, i, j] = pix - soft[0] * in_b * pix / (pix * in_b).sum() - old_part
    torch.testing.assert_close(grad, expected / (num_old * 4))


def _three_pixels(channels: int, last: int) -> torch.Tensor:
    """(1, channels, 1, 3) float64 logits, every channel -1e4 (probability exactly 0) except:
    pixel 0: channels 0, 1 and ``last`` at 0; pixel 1: channel 0 and ``last`` at ln 2, channel
    1 at 0; pixel 2 (void in the tests): all 0."""
    logits = torch.full((1, channels, 1, 3), -1e4, dtype=torch.float64)
    logits[0, [0, 1, last], 0, 0] = 0.0
    logits[0, [0, last], 0, 1] = math.log(2)
    logits[0, 1, 0, 1] = 0.0
    logits[0, :, 0, 2] = 0.0
    return logits


@pytest.mark.parametrize("reduction", ["valid", "all"])
def test_mib_ce_reduction_counts_void_pixels_only_under_all(reduction):
    """MiB's ``ce_reduction``, by hand, on one void pixel out of three (VOC 19-1).

    Step 0 (20 channels, plain CE): pixel 0, target 2, p = 1/3 -> ln 3; pixel 1, target 0,
    p = 2 / (2 + 1 + 2) -> ln 2.5. Step 1 (21 channels, old = 0..19, new = 20, unbiased CE):
    pixel 0, target 20, p = 1/3 -> ln 3; pixel 1, target 0, p(bg) = (2 + 1) / 5 (channels
    0..19 absorbed) -> ln(5/3). Mean over the 2 valid pixels, or over all 3 (UCD,
    ygjwd12345/UCD ``train.py:30, 38, 112, 116``)."""
    from incseg.methods.mib import MiB
    from incseg.models.segmenter import SegmenterOutput
    from incseg.protocol import get_setting, step_info

    setting = get_setting("voc", "19-1")
    method = MiB(ce_reduction=reduction, unkd=False)
    pixels = 2 if reduction == "valid" else 3
    targets = torch.tensor([[[2, 0, 255]]])
    info = step_info(setting, 0)
    terms = method.losses(SegmenterOutput(_three_pixels(20, 2), {}), None, targets, info)
    assert set(terms) == {"ce"}
    assert terms["ce"].item() == pytest.approx(math.log(7.5) / pixels, abs=1e-12)
    targets = torch.tensor([[[20, 0, 255]]])
    info = step_info(setting, 1)
    terms = method.losses(SegmenterOutput(_three_pixels(21, 20), {}), None, targets, info)
    assert set(terms) == {"unce"}
    assert terms["unce"].item() == pytest.approx(math.log(5) / pixels, abs=1e-12)
    # 0.805 (valid) against 0.536 (all): the two differ as soon as a pixel is void
    assert math.log(5) / 2 == pytest.approx(0.804719, abs=1e-6)
    assert math.log(5) / 3 == pytest.approx(0.536479, abs=1e-6)


def test_mib_ce_reduction_is_a_checked_choice():
    from incseg.config import config_from_dict
    from incseg.errors import ConfigError

    config = config_from_dict({"method": {"name": "mib", "ce_reduction": "all"}})
    assert config.method.build().ce_reduction == "all"
    assert config_from_dict({"method": {"name": "mib"}}).method.build().ce_reduction == "valid"
    with pytest.raises(ConfigError, match="ce_reduction"):
        config_from_dict({"method": {"name": "mib", "ce_reduction": "mean"}})
