"""EWF (Endpoints Weight Fusion) as an add-on: the fusion weight and formula on hand-computed cases,
its hooks around MiB's, and end to end through ``cli.main`` (a frozen background classifier fuses
to exactly ``b - w log(N + 1)``), with an exact resume of an interrupted step."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.method_runs import check_exact_resume, run_method

from incseg.config import config_from_dict
from incseg.engine.checkpoint import load_checkpoint
from incseg.methods.ewf import fuse_endpoints, fusion_weight
from incseg.models import build_segmenter
from incseg.protocol import get_setting, step_info


def test_fusion_weight_counts_the_background():
    # run.py:522 with train.py:144-150: sqrt(new / (new + old)), old including the background
    assert fusion_weight(step_info(get_setting("voc", "15-5"), 1)) == pytest.approx(
        math.sqrt(5 / 21)
    )
    assert fusion_weight(step_info(get_setting("voc", "15-1"), 1)) == pytest.approx(
        1 / math.sqrt(17)
    )
    assert fusion_weight(step_info(get_setting("voc", "15-1"), 5)) == pytest.approx(
        1 / math.sqrt(21)
    )
    assert fusion_weight(step_info(get_setting("ade", "100-50"), 1)) == pytest.approx(
        math.sqrt(50 / 151)
    )


def test_fuse_endpoints_by_hand():
    model = torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([1.0, 3.0]))
        model.running_mean.copy_(torch.tensor([4.0, -2.0]))
    model.num_batches_tracked.fill_(7)
    old = {
        "weight": torch.tensor([5.0, -1.0]),
        "running_mean": torch.tensor([0.0, 2.0]),
        "num_batches_tracked": torch.tensor(3),
    }
    fuse_endpoints(old, model, 0.25)
    assert model.weight.tolist() == [0.75 * 5 + 0.25 * 1, 0.75 * -1 + 0.25 * 3] == [4.0, 0.0]
    assert model.running_mean.tolist() == [1.0, 1.0]  # running statistics are fused too
    assert model.bias.tolist() == [0.0, 0.0]  # not in `old`: kept
    assert int(model.num_batches_tracked) == 7  # an integer buffer keeps the trained value


def test_hooks_around_mib():
    info = step_info(get_setting("voc", "15-5"), 1)
    config = config_from_dict({"method": {"name": "mib+ewf"}})
    method = config.method.build()
    torch.manual_seed(0)
    model = build_segmenter("tiny", info.channels_per_step[:1], head_channels=8)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_classifier(info.channels_per_step[-1])
    method.init_new_classifier(model, info)
    b = float(old["classifiers.0.bias"][0])
    assert float(model.classifiers[0].bias[0].detach()) == pytest.approx(
        b - math.log(6)
    )  # MiB's init ran
    method.begin_step(info, model)
    assert (
        not model.classifiers[0].weight.requires_grad and model.classifiers[1].weight.requires_grad
    )
    with torch.no_grad():  # "training" moves the backbone and the new classifier
        for p in model.backbone.parameters():
            p.add_(1.0)
        model.classifiers[1].bias.add_(2.0)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    method.end_step(info, model)
    w = math.sqrt(5 / 21)
    for name, value in model.state_dict().items():
        if name.startswith("classifiers.1.") or not value.is_floating_point():
            assert torch.equal(value, trained[name]), name
        else:
            torch.testing.assert_close(value, (1 - w) * old[name] + w * trained[name]), name
    assert float(model.classifiers[0].bias[0].detach()) == pytest.approx(b - w * math.log(6))


@pytest.fixture(scope="module")
def ewf_run(tiny_config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ewf") / "run"
    return out, run_method(tiny_config_path, out, "method.name=mib+ewf")


def test_a_run_fuses_each_step_and_freezes_the_old_classifiers(ewf_run):
    out, _ = ewf_run
    before, after = (
        load_checkpoint(out / "step_0.pt")["model"],
        load_checkpoint(out / "step_1.pt")["model"],
    )
    assert load_checkpoint(out / "step_1.pt")["config"]["method"]["ewf"] == {
        "freeze_old_classifiers": True
    }
    w = math.sqrt(5 / 21)
    # The background classifier was frozen after MiB's init: both endpoints are known exactly.
    assert torch.equal(after["classifiers.0.weight"], before["classifiers.0.weight"])
    bias = before["classifiers.0.bias"].clone()
    bias[0] = (1 - w) * bias[0] + w * (bias[0] - math.log(6))
    torch.testing.assert_close(after["classifiers.0.bias"], bias)
    # The backbone moved, and its fused value is neither endpoint.
    assert not torch.equal(
        after["backbone.layers.0.0.weight"], before["backbone.layers.0.0.weight"]
    )


def test_an_interrupted_ewf_step_resumes_to_the_same_numbers(ewf_run, tmp_path):
    out, args = ewf_run
    check_exact_resume(out, args, tmp_path)
