"""Golden tests of the baselines' losses on tiny hand-computed cases (SPEC section 6)."""

import math

import pytest
import torch

from incseg.config import MethodConfig
from incseg.losses import (
    feature_distillation,
    knowledge_distillation,
    one_hot_bce,
    sigmoid_distillation,
)
from incseg.methods import ILT, LwF, LwFMC
from incseg.models.segmenter import SegmenterOutput
from incseg.protocol import get_setting, step_info


def _pixel(values):
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1)


def _bce(logit, target):
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_lwf_kd_hand_computed():
    z, y = [1.0, -0.5, 2.0, 0.3], [0.2, 0.0, 1.0]  # 3 old channels; the 4th (new) is cut off
    zsum = sum(math.exp(v) for v in z[:3])
    ysum = sum(math.exp(v) for v in y)
    expected = -sum(math.exp(y[c]) / ysum * (z[c] - math.log(zsum)) for c in range(3)) / 3
    assert expected == pytest.approx(0.37497, abs=1e-5)  # by hand (5 digits): -(1/3) sum q log p
    assert knowledge_distillation(_pixel(z), _pixel(y)).item() == pytest.approx(expected, abs=1e-12)


def test_one_hot_bce_hand_computed_and_ignore():
    logits = torch.tensor(
        [[[[0.5, 1.0]], [[-1.0, 0.0]], [[2.0, 3.0]]]], dtype=torch.float64
    )  # (1,3,1,2)
    targets = torch.tensor([[[2, 255]]])
    expected = _bce(0.5, 0) + _bce(-1.0, 0) + _bce(2.0, 1)  # the 255 pixel is left out
    assert one_hot_bce(logits, targets).item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.974077 + 0.313262 + 0.126928, abs=1e-5)  # log(1+e^.5) etc.


def test_sigmoid_distillation_hand_computed():
    z, y = [0.0, 1.0, -2.0], [1.0, -1.0]
    sig = [1 / (1 + math.exp(-v)) for v in y]
    expected = 2 * (_bce(z[0], sig[0]) + _bce(z[1], sig[1])) / 2  # mean over 2 elements, times O=2
    assert sigmoid_distillation(_pixel(z), _pixel(y)).item() == pytest.approx(expected, abs=1e-12)


def test_feature_mse_hand_computed():
    new = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    old = torch.tensor([1.0, 0.0, 3.0, 1.0]).view(1, 4, 1, 1)
    assert feature_distillation(new, old).item() == pytest.approx((0 + 4 + 0 + 9) / 4)


def test_baseline_terms_and_weights():
    info0, info1 = (step_info(get_setting("voc", "15-5"), t) for t in (0, 1))
    gen = torch.Generator().manual_seed(0)
    logits, old = torch.randn(2, 21, 3, 3, generator=gen), torch.randn(2, 16, 3, 3, generator=gen)
    feats, old_feats = (
        torch.randn(2, 8, 1, 1, generator=gen),
        torch.randn(2, 8, 1, 1, generator=gen),
    )
    targets = torch.randint(0, 21, (2, 3, 3), generator=gen)
    out, old_out = (
        SegmenterOutput(logits, {"body": feats}),
        SegmenterOutput(old, {"body": old_feats}),
    )
    assert set(
        LwF().losses(SegmenterOutput(logits[:, :16], {}), None, targets.clamp(max=15), info0)
    ) == {"ce"}
    lwf = LwF().losses(out, old_out, targets, info1)
    torch.testing.assert_close(lwf["kd"], 100 * knowledge_distillation(logits, old))
    ilt = ILT().losses(out, old_out, targets, info1)
    assert set(ilt) == {"ce", "kd", "feature"} and ILT.features == ("body",)
    torch.testing.assert_close(ilt["feature"], 100 * feature_distillation(feats, old_feats))
    mc = LwFMC().losses(out, old_out, targets, info1)
    torch.testing.assert_close(mc["kd"], 10 * sigmoid_distillation(logits, old))
    assert set(LwFMC().losses(out, None, targets, info0)) == {"bce"}  # BCE also at step 0
    assert isinstance(MethodConfig("lwf_mc", {}).build(), LwFMC)
