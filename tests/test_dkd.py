"""DKD / DKD-M: the decomposed logits, every loss term by hand and against a literal re-statement
of the official losses, the novel-class initialisation, what a step > 0 trains, the prediction,
and end to end through ``cli.main`` with an exact resume of a step with a memory."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.method_runs import check_exact_resume, run_method, step_training_images

from incseg.methods.dkd import DKD, class_bce, new_class_targets
from incseg.models import build_segmenter
from incseg.models.heads import decomposed_logits
from incseg.models.segmenter import SegmenterOutput
from incseg.protocol import get_setting, step_info

DKD_SETS = ("method.name=dkd", "model.architecture=dkd", "protocol.labels=plop")


def dkd_model(channels=(16, 1)):
    torch.manual_seed(0)
    return build_segmenter("tiny", channels, head_channels=8, architecture="dkd")


def test_decomposed_logits_by_hand_and_their_sum():
    x = torch.tensor([3.0, 1.0]).view(1, 2, 1, 1)
    pos, neg = decomposed_logits(x, torch.tensor([[1.0, -2.0]]))
    assert pos.item() == 3.0 and neg.item() == -2.0
    model = dkd_model((16, 2))
    features = torch.rand(2, 8, 3, 3)  # non-negative, as the head's ReLU output
    pos, neg = decomposed_logits(features, model.class_weights())
    convs = [model.classifiers[0].objects, model.classifiers[1]]
    plain = torch.cat([F.conv2d(features, c.weight) for c in convs], dim=1)
    torch.testing.assert_close(pos + neg, plain)
    assert (pos >= 0).all() and (neg <= 0).all()


def test_the_model_returns_them_by_name():
    model = dkd_model((16, 2)).eval()
    out = model(torch.randn(1, 3, 32, 32), features=("logits_pos", "logits_neg", "head"))
    pos, neg = decomposed_logits(out.features["head"], model.class_weights())
    assert torch.equal(out.features["logits_pos"], pos)
    assert torch.equal(out.features["logits_neg"], neg) and neg.shape[1] == 17


def test_class_bce_by_hand():
    z = torch.zeros(1, 1, 1, 2)
    y = torch.tensor([[[[1.0, 0.0]]]])
    # Positive pixel: 2 ln 2 with pos_weight 2; negative pixel: ln 2; mean over the two pixels.
    assert math.isclose(float(class_bce(z, y, 2.0)), 1.5 * math.log(2), rel_tol=1e-6)


def test_void_pixels_are_negatives_of_the_new_classes():
    labels = torch.tensor([[[16, 255, 0, 3]]])
    assert new_class_targets(labels, 16, 2).tolist() == [[[[1, 0, 0, 0]], [[0, 0, 0, 0]]]]


def official_terms(logits, old_logits, pos, neg, old_pos, old_neg, label, n_old, n_new, pw):
    """T:341-376 and models/loss.py restated: WBCELoss (one-hot over the new classes from a zero
    target, BCE with pos_weight), KDLoss, ACLoss, each .mean([0, 2, 3]) and summed."""
    target = torch.zeros_like(logits[:, -n_new:])
    for c in label.unique():
        if c in (0, 255):
            continue
        target[:, int(c) - (n_old + 1)] = (label == int(c)).float()
    weight = torch.full([n_new], pw).view(-1, 1, 1)
    bce = F.binary_cross_entropy_with_logits(
        logits[:, -n_new:], target, pos_weight=weight, reduction="none"
    )
    kd = lambda z, t: F.binary_cross_entropy_with_logits(z, t, reduction="none")
    if old_logits is None:
        return {"mbce": bce.mean([0, 2, 3]).sum()}
    return {
        "mbce": bce.mean([0, 2, 3]).sum(),
        "kd": 5 * kd(logits[:, 1 : n_old + 1], old_logits[:, 1:].sigmoid()).mean([0, 2, 3]).sum(),
        "dkd_pos": 5 * kd(pos[:, :n_old], old_pos.sigmoid()).mean([0, 2, 3]).sum(),
        "dkd_neg": 5 * kd(neg[:, :n_old], old_neg.sigmoid()).mean([0, 2, 3]).sum(),
        "ac": kd(logits[:, 0:1], torch.zeros_like(logits[:, 0:1])).mean([0, 2, 3]).sum(),
    }


def test_losses_match_the_official_terms():
    torch.manual_seed(0)
    info = step_info(get_setting("voc", "15-1"), 2)  # 15 + 1 old classes, 1 new (17)
    logits, old_logits = torch.randn(2, 18, 6, 6), torch.randn(2, 17, 6, 6)
    pos, neg = torch.rand(2, 17, 3, 3), -torch.rand(2, 17, 3, 3)
    old_pos, old_neg = torch.rand(2, 16, 3, 3), -torch.rand(2, 16, 3, 3)
    raw = torch.randint(0, 18, (2, 6, 6))
    raw[0, 0] = 255
    label = torch.where((raw == 17) | (raw == 255), raw, 0)  # the step's labels: old classes are 0
    ours = DKD().losses(
        SegmenterOutput(logits, {"logits_pos": pos, "logits_neg": neg}),
        SegmenterOutput(old_logits, {"logits_pos": old_pos, "logits_neg": old_neg}),
        label,
        info,
    )
    ref = official_terms(logits, old_logits, pos, neg, old_pos, old_neg, label, 16, 1, 1.0)
    assert ours.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name])
    label = torch.where(raw <= 15, raw, 0).masked_fill(raw == 255, 255)
    first = DKD().losses(
        SegmenterOutput(logits[:, :16], {}), None, label, step_info(get_setting("voc", "15-1"), 0)
    )
    step0 = official_terms(logits[:, :16], None, None, None, None, None, label, 0, 15, 2.0)
    assert first.keys() == {"mbce", "ac"}
    torch.testing.assert_close(first["mbce"], step0["mbce"])


def test_new_classes_start_as_the_auxiliary_classifier():
    model = dkd_model()
    new = model.add_classifier(3)
    DKD().init_new_classifier(model, step_info(get_setting("voc", "15-5"), 1))
    aux = model.classifiers[0].auxiliary
    assert torch.equal(new.weight, aux.weight.expand_as(new.weight))
    assert torch.equal(new.bias, aux.bias.expand(3))


def test_a_later_step_freezes_norms_dropout_and_their_affines():
    model = dkd_model((16, 1))
    method, info = DKD(), step_info(get_setting("voc", "15-1"), 1)
    method.begin_step(info, model)
    model.train()
    kinds = (torch.nn.BatchNorm2d, torch.nn.Dropout)
    assert not any(m.training for m in model.modules() if isinstance(m, kinds))
    groups = method.param_groups(model, info)
    grouped = {id(p) for g in groups for p in g["params"]}
    norms = {
        id(p)
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters()
    }
    assert not grouped & norms and len(grouped) == sum(1 for _ in model.parameters()) - len(norms)
    assert [g.get("weight_decay") for g in groups] == [0.0, 0.0, 0.0, None]
    assert [g.get("lr_scale", 1) for g in groups] == [1, 10, 10, 10]
    assert groups[3]["params"] == list(model.classifiers[1].parameters())


def test_prediction_is_background_unless_a_class_exceeds_one_half():
    model = dkd_model()
    logits = torch.full((1, 16, 1, 3), -9.0)
    logits[0, 0] = 9.0  # the auxiliary channel never predicts
    logits[0, 4, 0, 1] = 0.1  # sigmoid 0.525 > 0.5
    logits[0, 4, 0, 2] = 0.0  # exactly 0.5: background, as (sigmoid > 0.5).sum() == 0
    assert model.scores(logits).argmax(1).tolist() == [[[0, 4, 0]]]


@pytest.fixture(scope="module")
def dkd_run(tiny_config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("dkd") / "run"
    sets = (*DKD_SETS, "method.memory_size=6", "protocol.setting=15-1", "protocol.last_step=2")
    return out, run_method(tiny_config_path, out, *sets)


def test_a_dkd_m_run_logs_every_term_and_its_memory(dkd_run):
    out, _ = dkd_run
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert set(steps[0]["losses"][0]) == {"mbce", "ac"}
    assert set(steps[2]["losses"][0]) == {"mbce", "kd", "dkd_pos", "dkd_neg", "ac"}
    for step in (1, 2):
        memory = json.loads((out / f"memory_step_{step}.json").read_text())["images"]
        assert len(memory) == 6 and steps[step]["memory"]["images"] == 6
        # Memory images join the training images and are not counted among them.
        assert steps[step]["num_train_images"] == step_training_images(out, step)


def test_an_interrupted_dkd_m_step_resumes_to_the_same_numbers(dkd_run, tmp_path):
    out, args = dkd_run
    check_exact_resume(out, args, tmp_path, kill_at="iteration:2:1:1")
