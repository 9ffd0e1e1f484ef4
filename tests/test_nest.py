"""NeST (new classifier pre-tuning) as an add-on: the similarity, the transformed classifier and
its installation on hand-computed tensors, the pre-tuning's effect on the model, and end to end
through ``cli.main`` with an exact resume of an interrupted step."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.method_runs import check_exact_resume, run_method
from helpers.step_data import FakeData

from incseg.config import config_from_dict
from incseg.engine.checkpoint import load_checkpoint
from incseg.errors import ConfigError
from incseg.losses import unbiased_cross_entropy, unbiased_cross_entropy_all_pixels
from incseg.methods.nest import (
    NeST,
    Transformation,
    similarity_sums,
    transformed_weights,
)
from incseg.models import build_segmenter
from incseg.protocol import get_setting, step_info


def test_similarity_by_hand():
    # Two old channels (background + one class), D = 2, one new class (channel 2).
    features = torch.tensor([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]])
    probs = torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]])
    labels = torch.tensor([2, 2, 0])  # the third pixel is not of the new class
    weights = torch.tensor([[2.0, -1.0], [-1.0, 4.0]])
    sums, counts = similarity_sums(features, probs, labels, weights, 2, 1)
    # 1[f_d W_cd > 0] p_c summed over pixels 0 and 1 (train.py:262-270):
    # pixel 0: f*W = [[2, 2], [-1, -8]] -> [[1, 1], [0, 0]] * p = [[.25, .25], [0, 0]]
    # pixel 1: f*W = [[1, 0], [-.5, 0]] -> [[1, 0], [0, 0]] * p = [[.5, 0], [0, 0]]
    assert counts.tolist() == [2.0]
    torch.testing.assert_close(sums[0], torch.tensor([[0.75, 0.25], [0.0, 0.0]]))


def test_similarity_matches_the_official_broadcast():
    torch.manual_seed(0)
    p, o, d, n = 50, 4, 6, 2
    features, weights = torch.randn(p, d), torch.randn(o, d)
    probs = torch.randn(p, o).softmax(1)
    labels = torch.randint(0, o + n, (p,))
    sums, counts = similarity_sums(features, probs, labels, weights, o, n)
    # train.py:262-270, literally: relu(f W) > 0, times p, summed over the class's pixels
    score = (F.relu(features[:, None, :] * weights) > 0).float() * probs[:, :, None]
    for k in range(n):
        torch.testing.assert_close(sums[k], score[labels == o + k].sum(0))
        assert counts[k] == (labels == o + k).sum()


def test_transformation_starts_from_the_similarity_and_keeps_empty_classes():
    torch.manual_seed(0)
    t = Transformation(num_new=2, num_old=3, dim=4, bias=0.5)
    init = t.scale_old[1].detach().clone()
    sums = torch.rand(2, 3, 4)
    missing = t.start_from(sums, torch.tensor([4.0, 0.0]))
    assert missing == [1]
    torch.testing.assert_close(t.scale_old[0], sums[0] / 4)
    torch.testing.assert_close(t.scale_new[0], (sums[0] / 4).sum(-1).softmax(-1))
    assert torch.equal(t.scale_old[1], init)  # no pixel: no 0/0, the init stays
    assert t.bias.tolist() == [0.5, 0.5]


def test_transformed_weights_by_hand():
    b = torch.tensor([[0.25, 0.75]])
    a = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])
    w = torch.tensor([[1.0, -1.0], [0.5, 3.0]])
    # 0.25 * [1*1, 2*-1] + 0.75 * [4*0.5, 0*3] = [0.25 + 1.5, -0.5]
    torch.testing.assert_close(transformed_weights(b, a, w), torch.tensor([[1.75, -0.5]]))


def _model(info, seed=0):
    torch.manual_seed(seed)
    model = build_segmenter("tiny", info.channels_per_step[:1], head_channels=4)
    model.add_classifier(info.channels_per_step[-1])
    return model


def test_install_by_hand():
    info = step_info(get_setting("voc", "15-5"), 1)  # 16 old channels, 5 new
    model = _model(info)
    first = model.classifiers[0]
    old_w = first.weight[:, :, 0, 0].detach().clone()
    old_b = first.bias.detach().clone()
    t = Transformation(5, 16, 4, bias=0.1)
    with torch.no_grad():
        t.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
        t.bg_scale_old.copy_(torch.tensor([2.0, 1.0, 1.0, 1.0]))
        t.bg_scale_new.fill_(3.0)
    t.install(model)
    # segmentation_module.py:530-555
    new = torch.einsum("no,nod,od->nd", t.scale_new, t.scale_old, old_w).detach()
    bias = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    torch.testing.assert_close(
        model.classifiers[1].bias.detach(), bias * old_b.norm() / bias.norm()
    )
    bg = 3 * torch.tensor([2.0, 1.0, 1.0, 1.0]) * old_w[0]
    bg = bg * old_w[0].norm() / bg.norm()
    torch.testing.assert_close(first.weight[0, :, 0, 0].detach(), bg)
    assert torch.equal(first.weight[1:, :, 0, 0].detach(), old_w[1:])  # other old rows kept
    assert torch.equal(first.bias.detach(), old_b)  # no MiB bias shift
    rows = torch.cat([bg[None], old_w[1:]])
    gamma = rows.norm(dim=1).mean() / new.norm(dim=1).mean()
    torch.testing.assert_close(model.classifiers[1].weight[:, :, 0, 0].detach(), new * gamma)


def test_unbiased_cross_entropy_all_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, 3)
    targets = torch.randint(0, 5, (2, 3, 3))
    # No void: the mean over all pixels is MiB's unbiased CE.
    torch.testing.assert_close(
        unbiased_cross_entropy_all_pixels(logits, targets, 3),
        unbiased_cross_entropy(logits, targets, 3),
    )
    targets[0, 0] = 255  # 3 of 18 pixels void: they count as zeros in the mean
    torch.testing.assert_close(
        unbiased_cross_entropy_all_pixels(logits, targets, 3),
        unbiased_cross_entropy(logits, targets, 3) * 15 / 18,
    )


def _step_batches(info, num=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num):
        images = torch.randn(2, 3, 32, 32, generator=g)
        targets = torch.zeros(2, 32, 32, dtype=torch.long)
        targets[:, 8:20, 8:20] = info.num_old_channels  # a new-class square
        targets[1, 20:28, 4:12] = info.num_old_channels + 2
        targets[:, :2] = 255
        batches.append((images, targets))
    return batches


def _pretune(method, info, batches, lr=0.01):
    model = _model(info)
    old = _model(info).eval()
    old.load_state_dict(model.state_dict())
    old.classifiers = old.classifiers[:-1]
    method.init_new_classifier(model, info)
    method.begin_step(info, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method.prepare_step(FakeData(batches, lr), info, model, old)
    return model, before


def test_prepare_step_writes_only_the_classifiers_and_skips_mibs_init():
    info = step_info(get_setting("voc", "15-5"), 1)
    method = config_from_dict({"method": {"name": "mib+nest"}}).method.build()
    model, before = _pretune(method, info, _step_batches(info))
    after = model.state_dict()
    for name, value in after.items():
        if name.startswith("classifiers.1.") or name == "classifiers.0.weight":
            assert not torch.equal(value, before[name]), name
        elif "running" in name or "num_batches" in name:
            assert not torch.equal(value, before[name]), name  # BN in training mode
        else:
            assert torch.equal(value, before[name]), name  # frozen weights, bg bias unshifted
    # Only the background row of the old classifier changed, and it kept its norm.
    w0, w1 = before["classifiers.0.weight"][:, :, 0, 0], after["classifiers.0.weight"][:, :, 0, 0]
    assert torch.equal(w0[1:], w1[1:])
    torch.testing.assert_close(w1[0].norm(), w0[0].norm())
    assert all(p.requires_grad for p in model.parameters())  # unfrozen for the training


def test_pretuning_lowers_the_unbiased_loss_and_a_single_update_has_lr_zero():
    info = step_info(get_setting("voc", "15-5"), 1)
    batches = _step_batches(info, num=3)

    def loss_after(epochs, lr):
        method = NeST(epochs=epochs, lr_scale=1.0)
        torch.manual_seed(5)
        model, _ = _pretune(method, info, batches, lr)
        model.eval()
        with torch.no_grad():
            return sum(
                float(unbiased_cross_entropy_all_pixels(model(x).logits, y, info.num_old_channels))
                for x, y in batches
            )

    # With one iteration the official scheduler has already stepped to (1 - 1/1)^0.9 = 0
    # before the update (train.py:361-364): the installed classifier is the starting one.
    method = NeST(epochs=1)
    torch.manual_seed(5)
    one, _ = _pretune(method, info, batches[:1], lr=50.0)
    method = NeST(epochs=1)
    torch.manual_seed(5)
    tiny_lr, _ = _pretune(method, info, batches[:1], lr=1e-30)
    torch.testing.assert_close(one.classifiers[1].weight, tiny_lr.classifiers[1].weight)
    assert loss_after(epochs=20, lr=0.5) < loss_after(epochs=1, lr=0.5)


def test_bias_init_choices_and_validation():
    info = step_info(get_setting("voc", "15-5"), 1)
    model = _model(info)
    old = _model(info).eval()
    old.classifiers = old.classifiers[:-1]
    data = FakeData(_step_batches(info))
    background = float(model.classifiers[0].bias[0].detach())
    bound = 1 / math.sqrt(model.classifiers[0].in_channels)
    started = {
        init: NeST(bias_init=init)._start(data, info, model, old).bias.detach()
        for init in ("background", "random")
    }
    # One value repeated: the trained background bias, or one draw of a fresh conv's bias init.
    assert started["background"].tolist() == [pytest.approx(background)] * 5
    assert len(set(started["random"].tolist())) == 1
    assert abs(float(started["random"][0])) <= bound
    with pytest.raises(ConfigError, match="bias_init"):
        config_from_dict({"method": {"name": "mib+nest", "nest": {"bias_init": "zero"}}})
    with pytest.raises(ConfigError, match="epochs"):
        config_from_dict({"method": {"name": "mib+nest", "nest": {"epochs": -1}}})


@pytest.fixture(scope="module")
def nest_run(tiny_config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("nest") / "run"
    return out, run_method(tiny_config_path, out, "method.name=mib+nest", "method.nest.epochs=2")


def test_a_run_pretunes_the_new_classifier(nest_run):
    out, _ = nest_run
    before, after = (
        load_checkpoint(out / "step_0.pt")["model"],
        load_checkpoint(out / "step_1.pt")["model"],
    )
    assert load_checkpoint(out / "step_1.pt")["config"]["method"]["nest"]["epochs"] == 2
    assert after["classifiers.1.weight"].shape[0] == 5
    assert torch.isfinite(after["classifiers.1.weight"]).all()
    summary = json.loads((out / "metrics.json").read_text())["steps"]
    assert len(summary) == 2 and math.isfinite(summary[1]["miou_all"])
    assert not torch.equal(after["classifiers.0.weight"], before["classifiers.0.weight"])


def test_an_interrupted_nest_step_resumes_to_the_same_numbers(nest_run, tmp_path):
    out, args = nest_run
    check_exact_resume(out, args, tmp_path)
