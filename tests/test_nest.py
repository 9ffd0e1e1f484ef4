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


ONE_STEP_INFO = step_info(get_setting("voc", "15-5"), 1)  # 16 old channels, N = 5 new


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


def _old_of(model, info=ONE_STEP_INFO):
    """The frozen previous-step model of ``model`` (its weights, without the new classifier)."""
    old = _model(info).eval()
    old.load_state_dict(model.state_dict())
    old.classifiers = old.classifiers[:-1]
    return old


def _pretune_with(method, info, data):
    model = _model(info)
    old = _old_of(model, info)
    method.init_new_classifier(model, info)
    method.begin_step(info, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method.prepare_step(data, info, model, old)
    return model, before


def _pretune(method, info, batches, lr=0.01):
    return _pretune_with(method, info, FakeData(batches, lr))


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


@pytest.mark.parametrize("name", ["mib+nest", "plop+nest"])
def test_epochs_zero_leaves_the_base_methods_balanced_init(name):
    info = ONE_STEP_INFO
    method = config_from_dict({"method": {"name": name, "nest": {"epochs": 0}}}).method.build()
    assert not method.addons[0].replaces_classifier_init(info)
    model = _model(info)
    w_bg = model.classifiers[0].weight[0, :, 0, 0].detach().clone()
    b_bg = float(model.classifiers[0].bias[0].detach())
    method.init_new_classifier(model, info)
    if name == "mib+nest":  # the rest of the step's preparation leaves it as it is
        method.begin_step(info, model)
        method.prepare_step(FakeData(_step_batches(info)), info, model, _old_of(model))
    # MiB's init (segmentation_module.py init_new_classifier): weights = w_bg, biases and the
    # background bias = b_bg - log(N + 1), N = 5.
    new = model.classifiers[1]
    assert torch.equal(new.weight[:, :, 0, 0].detach(), w_bg.expand(5, -1))
    expected = torch.full((5,), b_bg - math.log(6))
    torch.testing.assert_close(new.bias.detach(), expected)
    torch.testing.assert_close(model.classifiers[0].bias[0].detach(), expected[0])


def test_epochs_above_zero_replaces_the_base_init_at_steps_after_the_first():
    info = ONE_STEP_INFO
    method = config_from_dict(
        {"method": {"name": "mib+nest", "nest": {"epochs": 1}}}
    ).method.build()
    nest = method.addons[0]
    assert nest.replaces_classifier_init(info)
    assert not nest.replaces_classifier_init(step_info(get_setting("voc", "15-5"), 0))
    model = _model(info)
    b_bg = model.classifiers[0].bias.detach().clone()
    new_before = model.classifiers[1].weight.detach().clone()
    method.init_new_classifier(model, info)  # MiB's init skipped: nothing moves
    assert torch.equal(model.classifiers[0].bias.detach(), b_bg)
    assert torch.equal(model.classifiers[1].weight.detach(), new_before)
    method.prepare_step(FakeData(_step_batches(info)), info, model, _old_of(model))
    assert not torch.equal(model.classifiers[1].weight.detach(), new_before)  # NeST's init
    assert torch.equal(model.classifiers[0].bias.detach(), b_bg)  # the bias is not shifted


class _AmpData(FakeData):
    """The fake step data under ``amp`` (None, float16 or bfloat16) on the CPU; keeps what every
    ``mean_over_processes`` call sees (the pre-tuning's gradients, before the scaler unscales)."""

    def __init__(self, batches, amp, lr=0.01):
        super().__init__(batches, lr)
        self.amp, self.seen = amp, []

    def autocast(self):
        if self.amp is None:
            return super().autocast()
        return torch.autocast("cpu", dtype=self.amp)

    def mean_over_processes(self, tensor):
        self.seen.append(tensor.detach().clone())
        return tensor


def _first_gradients(amp, batches):
    """The transformation's gradients of the pre-tuning's first iteration as the loop hands them
    to the all-reduce, and the installed new classifier."""
    info = ONE_STEP_INFO
    data = _AmpData(batches, amp)
    torch.manual_seed(5)
    model, _ = _pretune_with(NeST(epochs=1), info, data)
    return data.seen[:5], model.classifiers[1].weight.detach()


def _reference_gradients(batches):
    """The unscaled float32 gradients of the first iteration, restated: the same start, one
    forward of the transformed classifier on the first batch, MiB's all-pixel unbiased CE."""
    info = ONE_STEP_INFO
    torch.manual_seed(5)
    model = _model(info)
    old = _old_of(model)
    transform = NeST(epochs=1)._start(FakeData(batches), info, model, old)
    model.requires_grad_(False)
    model.train()
    images, targets = batches[0]
    small = transform.logits(model.head(model.backbone(images)), model)
    logits = F.interpolate(small, images.shape[-2:], mode="bilinear", align_corners=False)
    loss = unbiased_cross_entropy_all_pixels(logits, targets, info.num_old_channels)
    return torch.autograd.grad(loss, list(transform.parameters()))


def _relative_error(got, want):
    num = sum(float((g - w).norm() ** 2) for g, w in zip(got, want, strict=True))
    den = sum(float(w.norm() ** 2) for w in want)
    return math.sqrt(num / den)


def test_fp16_pretuning_scales_the_loss_and_bf16_and_fp32_do_not():
    batches = _step_batches(ONE_STEP_INFO, num=2)
    reference = _reference_gradients(batches)
    seen, installed = {}, {}
    for name, amp in (("off", None), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        seen[name], installed[name] = _first_gradients(amp, batches)
    # float32: the gradients are the loss's own, as before (no scaler).
    assert _relative_error(seen["off"], reference) < 1e-5
    # fp16: GradScaler's initial scale 2^16 (apex's dynamic scaler starts there too) multiplies
    # every gradient the loop reduces; the update uses them unscaled, so the installed
    # classifier is float32's up to fp16 rounding.
    assert _relative_error(seen["fp16"], [g * 2.0**16 for g in reference]) < 1e-2
    torch.testing.assert_close(installed["fp16"], installed["off"], rtol=1e-2, atol=1e-3)
    # bf16: no scaler (bf16 has float32's range), the gradients are the unscaled ones.
    assert _relative_error(seen["bf16"], reference) < 5e-2
