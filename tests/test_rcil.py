"""RCIL: the two-branch architecture (the folded evaluation equals the two branches' average, the
merge, the drop-path), pooled-cube distillation against a literal re-statement of the official
functions and by hand, the classifier init, and end to end through ``cli.main`` with an exact
resume."""

from __future__ import annotations

import copy
import json
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers.method_runs import check_exact_resume, run_method
from torch import nn

from incseg.cli import main
from incseg.config import config_from_dict
from incseg.engine.checkpoint import load_checkpoint
from incseg.engine.model_io import build_model
from incseg.errors import ConfigError
from incseg.methods.rcil import pcd_channel, pcd_spatial
from incseg.models.rcil import (
    ParallelConvBN,
    draw_drop_path,
    first_branch_weight,
    fold,
    parallel_layers,
)
from incseg.protocol import get_setting, step_info

TINY = {"backbone": "tiny", "norm": "iabn", "head_channels": 8, "architecture": "rcil"}


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(m, nn.Conv2d):
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.05)


def _model(step=0, seed=0):
    torch.manual_seed(seed)
    config = config_from_dict({"model": TINY, "method": {"name": "rcil"}})
    model = build_model(config, step_info(get_setting("voc", "15-5"), step))
    _randomise_norms(model, seed)
    return model


def test_the_architecture_has_two_branches_where_the_official_has():
    model = _model()
    layers = parallel_layers(model)
    assert len(layers) == 6 + 4  # every tiny conv layer, the four ASPP convs
    # Backbone branches start as copies (segmentation_module.py:41-67); head branches independent.
    torch.manual_seed(0)
    fresh = build_model(
        config_from_dict({"model": TINY, "method": {"name": "rcil"}}),
        step_info(get_setting("voc", "15-5"), 0),
    )
    backbone, head = parallel_layers(fresh.backbone), parallel_layers(fresh.head)
    assert all(torch.equal(p.conv1.weight, p.conv2.weight) for p in backbone)
    assert not any(torch.equal(p.conv1.weight, p.conv2.weight) for p in head)


def test_resnet_conversion_covers_every_bottleneck_and_drops_the_stem_activation():
    config = config_from_dict(
        {"model": {"backbone": "resnet50", "architecture": "rcil"}, "method": {"name": "rcil"}}
    )
    model = build_model(config, step_info(get_setting("voc", "15-5"), 0), pretrained=False)
    assert len(parallel_layers(model.backbone)) == 3 + 4 + 6 + 3
    assert isinstance(model.backbone.relu, nn.Identity)
    assert isinstance(model.backbone.layer1[0].bn2, nn.Identity)


def test_folded_evaluation_equals_the_average_of_both_branches():
    model = _model().eval()
    x = torch.randn(2, 3, 32, 32)
    folded = model(x).logits
    for layer in parallel_layers(model):
        layer.fold_in_eval = False
    both = model(x).logits
    torch.testing.assert_close(folded, both, atol=1e-5, rtol=1e-5)


def test_merge_keeps_the_average_in_the_first_branch_and_freezes_it():
    torch.manual_seed(0)
    layer = ParallelConvBN(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    _randomise_norms(layer, 3)
    before = layer.folded()
    layer.merge()
    after = fold(layer.conv1, layer.norm1)
    torch.testing.assert_close(after[0], before[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(after[1], before[1], atol=1e-6, rtol=1e-6)
    assert bool(layer.merged) and not layer.conv1.weight.requires_grad
    assert layer.conv2.weight.requires_grad  # the second branch trains on
    # In training, the merged branch applies its statistics (no batch statistics, no update).
    layer.train()
    x = torch.randn(2, 3, 5, 5) * 3 + 1
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    r = torch.rand(1, 4, 1, 1)
    w1 = torch.where(r < 0.33, 2.0, torch.where(r < 0.66, 0.0, 1.0))
    first = F.conv2d(x, after[0], after[1], padding=1)
    second = F.batch_norm(layer.conv2(x), None, None, layer.norm2.weight, layer.norm2.bias, True)
    torch.testing.assert_close(out, 0.5 * w1 * first + 0.5 * (2 - w1) * second)
    assert torch.equal(layer.norm1.running_var, torch.ones(4))


def test_drop_path_frequencies():
    torch.manual_seed(0)
    layer = ParallelConvBN(nn.Conv2d(1, 20000, 1, bias=False), nn.BatchNorm2d(20000)).train()
    with torch.no_grad():
        layer.conv1.weight.fill_(1.0)
        layer.conv2.weight.fill_(-1.0)
    x = torch.tensor([[[[1.0, -1.0]]]]).repeat(2, 1, 1, 1)
    out = layer(x)[0, :, 0, 0]  # branch 1 alone: +1, branch 2 alone: -1, average: 0
    shares = [float((out > 0.5).float().mean()), float((out < -0.5).float().mean())]
    assert shares == pytest.approx([0.33, 0.33], abs=0.01)


def official_aspp_mix(out, out_new):
    """zhangchbin/RCIL modules/deeplab.py:70-84 restated (training): ONE draw over the four
    branches' concatenated maps, then the weights of each branch and the activation."""
    r = torch.rand(1, out.shape[1], 1, 1, dtype=torch.float32)
    weight_out_branch = torch.zeros_like(r)
    weight_out_new_branch = torch.zeros_like(r)
    weight_out_branch[r < 0.33] = 2.0
    weight_out_new_branch[r < 0.33] = 0.0
    weight_out_branch[(r < 0.66) * (r >= 0.33)] = 0.0
    weight_out_new_branch[(r < 0.66) * (r >= 0.33)] = 2.0
    weight_out_branch[r >= 0.66] = 1.0
    weight_out_new_branch[r >= 0.66] = 1.0
    out = out * weight_out_branch * 0.5 + out_new * weight_out_new_branch * 0.5
    return F.leaky_relu(out, 0.01), weight_out_branch


class _RandSpy:
    """Records the size of every ``torch.rand`` call and passes it on."""

    def __init__(self):
        self.sizes, self._rand = [], torch.rand

    def __call__(self, *size, **kwargs):
        self.sizes.append(tuple(size))
        return self._rand(*size, **kwargs)


def test_the_head_draws_its_drop_path_once_as_the_official_does():
    model = _model().train()
    head, width = model.head, model.head.branches[0].conv1.out_channels
    x = torch.randn(2, head.branches[0].conv1.in_channels, 6, 6)
    twin = copy.deepcopy(head)  # the same weights and norm state for the restatement
    spy = _RandSpy()
    with mock.patch("torch.rand", spy):
        torch.manual_seed(3)
        got = head(x)
    assert spy.sizes == [(1, 4 * width, 1, 1)]  # one draw of the concatenated size
    torch.manual_seed(3)
    out = torch.cat([b.norm1(b.conv1(x)) for b in twin.branches], dim=1)
    out_new = torch.cat([b.norm2(b.conv2(x)) for b in twin.branches], dim=1)
    mixed, weight_out_branch = official_aspp_mix(out, out_new)
    expected = twin.out_norm(twin.reduce(mixed) + twin.pool(x))
    torch.testing.assert_close(got, expected)
    # The mask itself: the split draw's first-branch weights are the official ones.
    torch.manual_seed(3)
    draw = draw_drop_path(4 * width)
    assert torch.equal(first_branch_weight(draw), weight_out_branch)
    assert {0.0, 1.0, 2.0} == set(weight_out_branch.flatten().tolist())
    # In the whole model the head draws last, after one draw per backbone layer.
    spy = _RandSpy()
    with mock.patch("torch.rand", spy):
        model(torch.randn(2, 3, 32, 32))
    backbone = [(1, p.conv1.out_channels, 1, 1) for p in parallel_layers(model.backbone)]
    assert spy.sizes == [*backbone, (1, 4 * width, 1, 1)]


def official_spatial(la, lb, index_new_class, nb_current_classes, nb_new_classes, voc=True):
    """zhangchbin/RCIL train.py:70-133 restated."""
    loss = torch.tensor(0.0)
    for i, (a, b) in enumerate(zip(la, lb, strict=True)):
        if a.shape[1] != b.shape[1]:
            _b = torch.zeros_like(a)
            _b[:, 0] = b[:, 0] + b[:, index_new_class:].sum(dim=1)
            _b[:, 1:] = b[:, 1:index_new_class]
            b = _b
        a, b = a**2, b**2
        layer = 0
        for k in (4, 8, 16, 20, 24, 12):
            pa = F.avg_pool2d(a, (k, k), stride=1, padding=k // 2)
            pb = F.avg_pool2d(b, (k, k), stride=1, padding=k // 2)
            layer = layer + torch.norm((pa - pb).view(a.shape[0], -1), dim=-1).mean()
        layer = layer / 6.0
        f = 0.0005 if i == len(la) - 1 else 0.01
        loss = loss + layer * math.sqrt(nb_current_classes / nb_new_classes) * f
    return loss / len(la)


def official_channel(la, lb, index_new_class, nb_current_classes, nb_new_classes):
    """zhangchbin/RCIL train.py:20-67 restated."""
    loss = torch.tensor(0.0)
    la, lb = la[:-1], lb[:-1]
    for i, (a, b) in enumerate(zip(la, lb, strict=True)):
        a, b = a**2, b**2
        pa = F.avg_pool2d(a.permute(0, 2, 1, 3), (3, 1), stride=1, padding=(1, 0))
        pb = F.avg_pool2d(b.permute(0, 2, 1, 3), (3, 1), stride=1, padding=(1, 0))
        layer = torch.norm((pa - pb).view(a.shape[0], -1), dim=-1).mean()
        f = 0.0005 if i == len(la) - 1 else 0.01
        loss = loss + layer * math.sqrt(nb_current_classes / nb_new_classes) * f
    return loss / len(la)


def test_pcd_matches_the_official_functions():
    torch.manual_seed(0)
    shapes = [(2, 5, 9, 9), (2, 6, 5, 5), (2, 7, 3, 3), (2, 7, 3, 3), (2, 4, 3, 3)]
    old = [torch.randn(s) for s in shapes] + [torch.randn(2, 16, 3, 3)]
    new = [torch.randn(s, requires_grad=True) for s in shapes]
    new.append(torch.randn(2, 17, 3, 3, requires_grad=True))  # one more channel: summed into bg
    schedule = math.sqrt(17 / 1)
    spatial = pcd_spatial(old, new, [0.01] * 5 + [0.0005], schedule)
    channel = pcd_channel(old[:-1], new[:-1], [0.01] * 4 + [0.0005], schedule)
    torch.testing.assert_close(spatial, official_spatial(old, new, 16, 17, 1))
    torch.testing.assert_close(channel, official_channel(old, new, 16, 17, 1))
    (g,) = torch.autograd.grad(spatial + channel, new[-1])
    (g_ref,) = torch.autograd.grad(
        official_spatial(old, new, 16, 17, 1) + official_channel(old, new, 16, 17, 1), new[-1]
    )
    torch.testing.assert_close(g, g_ref)


def test_pcd_channel_by_hand():
    # One image, three channels at one pixel: old squared [1, 4, 9], new squared [0, 0, 0].
    old = [torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)]
    new = [torch.zeros(1, 3, 1, 1)]
    # 3-channel averages with zero padding counted: [5/3, 14/3, 13/3]
    expected = math.sqrt((5 / 3) ** 2 + (14 / 3) ** 2 + (13 / 3) ** 2)
    assert float(pcd_channel(old, new, [1.0], 2.0)) == pytest.approx(2 * expected)


def test_new_classifier_copies_the_background_weight_only():
    info = step_info(get_setting("voc", "15-5"), 1)
    model = _model()
    bias0 = model.classifiers[0].bias.detach().clone()
    model.add_classifier(5)
    new_bias = model.classifiers[1].bias.detach().clone()
    method = config_from_dict({"model": TINY, "method": {"name": "rcil"}}).method.build()
    method.init_new_classifier(model, info)
    w = model.classifiers[1].weight[:, :, 0, 0]
    assert torch.equal(w, model.classifiers[0].weight[0, :, 0, 0].expand_as(w))
    assert torch.equal(model.classifiers[1].bias, new_bias)  # random init kept
    assert torch.equal(model.classifiers[0].bias, bias0)  # no MiB shift
    method.begin_step(info, model)
    assert all(bool(p.merged) for p in parallel_layers(model))


def test_rcil_needs_its_architecture():
    with pytest.raises(ConfigError, match="model.architecture"):
        config_from_dict({"method": {"name": "rcil"}})


@pytest.fixture(scope="module")
def rcil_run(tiny_config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("rcil") / "run"
    sets = ("method.name=rcil", "model.architecture=rcil")
    return out, run_method(tiny_config_path, out, *sets)


def test_a_run_merges_and_evaluates(rcil_run, capsys):
    out, _ = rcil_run
    step0, step1 = (load_checkpoint(out / f"step_{k}.pt")["model"] for k in (0, 1))
    assert not bool(step0["backbone.layers.0.0.merged"])
    assert bool(step1["backbone.layers.0.0.merged"])
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert all(math.isfinite(e["pcd"]) and e["pcd"] > 0 for e in steps[1]["losses"])
    capsys.readouterr()
    assert main(["eval", str(out / "step_1.pt"), "--no-progress"]) == 0  # rebuilt from its config


def test_an_interrupted_rcil_step_resumes_to_the_same_numbers(rcil_run, tmp_path):
    out, args = rcil_run
    check_exact_resume(out, args, tmp_path)


def test_evaluation_folds_once_and_refolds_after_a_change():
    torch.manual_seed(0)
    layer = ParallelConvBN(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).eval()
    _randomise_norms(layer, 1)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        first = layer(x)
        cached = layer._cache[0]
        assert layer(x).equal(first) and layer._cache[0] is cached  # folded once
        layer.conv2.weight.mul_(2.0)  # an in-place change (as load_state_dict makes)
        changed = layer(x)
    weight, bias = layer.folded()
    torch.testing.assert_close(changed, F.conv2d(x, weight, bias, padding=1))
    assert not changed.equal(first)
