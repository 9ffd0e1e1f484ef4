"""The query-based model in incseg: the segmenter's growing class head and its two inferences,
the official optimiser's parameter groups, steps counted in iterations, the configs that mix a
DeepLab method with Mask2Former, and a tiny Mask2Former run through the command line that
resumes to identical numbers after a kill."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.method_runs import check_exact_resume, run_method
from torch import nn

from incseg.comformer_losses import comformer_inference
from incseg.config import Mask2FormerConfig, TrainConfig, load_config
from incseg.engine.checkpoint import load_checkpoint
from incseg.errors import ConfigError
from incseg.methods.query import QueryFineTuning, mask2former_param_groups, targets_of
from incseg.models.build import build_segmenter
from incseg.query_losses import semantic_inference

TINY = {
    **Mask2FormerConfig().__dict__,
    "num_queries": 6,
    "hidden_dim": 16,
    "nheads": 2,
    "dec_layers": 2,
    "dim_feedforward": 16,
    "conv_dim": 32,
    "mask_dim": 16,
    "enc_layers": 1,
    "enc_dim_feedforward": 16,
}
M2F_SETS = (
    "model.architecture=mask2former",
    "method.name=m2f_ft",
    (
        "model.mask2former={num_queries: 6, hidden_dim: 16, nheads: 2, dec_layers: 2, "
        "dim_feedforward: 16, conv_dim: 32, mask_dim: 16, enc_layers: 1, enc_dim_feedforward: 16}"
    ),
    "method.num_points=64",
    "train.optimizer=adamw",
    "train.weight_decay=0.05",
    "train.clip_grad_norm=0.01",
    "train.lr=0.001",
    "train.lr_incremental=0.0001",
)


def model(channels=(16, 5), **sizes):
    torch.manual_seed(0)
    net = build_segmenter("tiny", channels, architecture="mask2former", query_sizes=TINY | sizes)
    return net.eval()


def test_the_class_head_grows_per_step_with_no_object_last():
    net = model((16,))
    out = net(torch.randn(2, 3, 32, 32))
    assert out.pred_logits.shape == (2, 6, 17) and out.pred_masks.shape == (2, 6, 8, 8)
    assert len(out.aux_outputs) == 2 and out.first_channel == 0
    net.add_classifier(5)
    assert net.channels_per_step == (16, 5) and net.num_channels == 21
    grown = net(torch.randn(2, 3, 32, 32)).pred_logits
    head = net.predictor.class_embed
    q = torch.randn(1, 3, 16)
    expected = torch.cat([head.classifiers[0](q), head.classifiers[1](q), head.no_object(q)], -1)
    assert grown.shape[-1] == 22 and torch.equal(head(q), expected)


def test_a_head_without_background_counts_channel_0_but_has_no_row_for_it():
    net = model((16, 5), background=False)
    assert [c.out_features for c in net.classifiers] == [15, 5]
    assert net.channels_per_step == (16, 5)  # as the step's StepInfo counts them
    out = net(torch.randn(1, 3, 64, 64))  # GroupNorm(32) needs res5 larger than 1x1
    assert out.pred_logits.shape[-1] == 21 and out.first_channel == 1
    scores = net.prediction_scores(out)
    assert scores.shape == (1, 21, 64, 64) and bool((scores[:, 0] == 0).all())


def test_semantic_scores_are_mask2formers_inference_at_input_size():
    net = model()
    out = net(torch.randn(2, 3, 32, 32))
    masks = nn.functional.interpolate(out.pred_masks, size=(32, 32), mode="bilinear")
    expected = semantic_inference(out.pred_logits, masks)
    assert torch.allclose(net.prediction_scores(out), expected, atol=1e-6)


def test_comformer_inference_by_hand():
    """Query 0 (class 1, p=0.9) claims the left pixel; query 1 (class 0, p=0.6) the right one,
    but its mask probability there is below 0.5 after the softmax over all three queries;
    query 2 is no-object. Left: class 1 + 1 = 2; right: 0 (unpainted)."""
    logits = torch.log(torch.tensor([[[0.05, 0.9, 0.05], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]]))
    # mask probabilities after the softmax over queries: left [0.8, 0.1, 0.1], right [0.3, 0.4, 0.3]
    probs = torch.tensor([[0.8, 0.3], [0.1, 0.4], [0.1, 0.3]])
    masks = probs.log().reshape(1, 3, 1, 2)
    # right pixel: scores x masks = 0.9 * 0.3 = 0.27 (query 0) vs 0.6 * 0.4 = 0.24 (query 1):
    # query 0 wins the pixel but its mask there (0.3) is below 0.5
    assert comformer_inference(logits, masks).tolist() == [[[2, 0]]]
    probs[:, 1] = torch.tensor([0.2, 0.6, 0.2])  # now query 1 wins with 0.36 and 0.6 >= 0.5
    assert comformer_inference(logits, probs.log().reshape(1, 3, 1, 2)).tolist() == [[[2, 1]]]


def test_comformer_inference_gives_one_hot_scores_of_the_channels():
    net = model((16,), background=False, inference="comformer", mask_activation="softmax")
    out = net(torch.randn(1, 3, 64, 64))
    scores = net.prediction_scores(out)
    masks = nn.functional.interpolate(out.pred_masks, size=(64, 64), mode="bilinear")
    assert torch.equal(scores.argmax(1), comformer_inference(out.pred_logits, masks))
    assert bool((scores.sum(1) == 1).all())


def official_groups(model, base_lr, weight_decay, backbone_multiplier):
    """facebookresearch/Mask2Former train_net.py:184-230 restated: one group per parameter."""
    norms = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.SyncBatchNorm)
    params, memo = [], set()
    for module_name, module in model.named_modules():
        for value in module.parameters(recurse=False):
            if not value.requires_grad or value in memo:
                continue
            memo.add(value)
            lr, wd = base_lr, weight_decay
            if "backbone" in module_name:
                lr = lr * backbone_multiplier
            if isinstance(module, norms):
                wd = 0.0
            if isinstance(module, nn.Embedding):
                wd = 0.0
            params.append((value, lr, wd))
    return params


def test_parameter_groups_are_the_official_optimisers():
    net = model()
    groups = mask2former_param_groups(net, 0.1, 0.05)
    ours = {id(p): (1e-4 * g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    official = official_groups(net, 1e-4, 0.05, 0.1)
    assert len(ours) == len(official) == len(list(net.parameters()))
    for value, lr, wd in official:
        assert ours[id(value)] == pytest.approx((lr, wd)), value.shape
    assert any(wd == 0 for _, _, wd in official) and any(lr < 1e-4 for _, lr, _ in official)
    # the method leaves the decaying groups to the optimiser's train.weight_decay
    method_groups = QueryFineTuning().param_groups(net, None)
    assert {g.get("weight_decay") for g in method_groups} == {None, 0.0}


def test_targets_drop_the_background_of_a_head_without_it():
    labels = torch.tensor([[[0, 3, 255], [3, 0, 7]]])
    with_bg = targets_of(labels, 0)[0]
    assert with_bg["labels"].tolist() == [0, 3, 7]
    without = targets_of(labels, 1)[0]
    assert without["labels"].tolist() == [2, 6]
    assert without["masks"].tolist() == [[[0, 1, 0], [1, 0, 0]], [[0, 0, 0], [0, 0, 1]]]


@pytest.mark.parametrize(
    ("sets", "expected"),
    [({}, (3, 30)), ({"iterations": 25}, (3, 25)), ({"iterations": 20}, (2, 20))],
)
def test_a_step_counted_in_iterations_runs_the_epochs_it_needs(sets, expected):
    train = TrainConfig(epochs=3, **sets)
    assert train.schedule_at(0, 10) == expected
    incremental = TrainConfig(epochs=3, iterations=25, iterations_incremental=7)
    assert incremental.schedule_at(1, 10) == (1, 7) and incremental.schedule_at(0, 10) == (3, 25)


def test_a_deeplab_method_on_mask2former_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {architecture: mask2former}\nmethod: {name: mib}\n")
    with pytest.raises(ConfigError, match="method 'mib' trains per-pixel logits"):
        load_config(path, [])
    with pytest.raises(ConfigError, match="method 'm2f_ft' trains the 'mask2former'"):
        load_config(path, ["model.architecture=deeplabv3", "method.name=m2f_ft"])
    with pytest.raises(ConfigError, match="name the method alone \\(m2f_ft\\)"):
        load_config(path, ["method.name=m2f_ft+ewf"])
    with pytest.raises(ConfigError, match="conv_dim: 48 is not a multiple of 32"):
        load_config(path, ["method.name=m2f_ft", "model.mask2former.conv_dim=48"])


@pytest.fixture(scope="module")
def m2f_run(tiny_config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("m2f") / "run"
    return out, run_method(tiny_config_path, out, *M2F_SETS, "train.iterations_incremental=9")


def test_a_tiny_mask2former_run_trains_and_reports_every_step(m2f_run):
    out, _ = m2f_run
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert len(steps) == 2 and len(steps[1]["per_class"]) == 21
    assert {"ce", "mask", "dice"} <= set(steps[0]["losses"][0])
    batches = -(-steps[1]["num_train_images"] // 8)
    assert batches < 9 and len(steps[1]["losses"]) == -(-9 // batches)  # epochs 9 iterations need
    checkpoint = load_checkpoint(out / "step_1.pt")
    assert any(k.startswith("predictor.class_embed.classifiers.1") for k in checkpoint["model"])


def test_an_interrupted_mask2former_step_resumes_to_the_same_numbers(m2f_run, tmp_path):
    out, args = m2f_run
    check_exact_resume(
        out, args, tmp_path, kill_at="iteration:1:1:1"
    )  # in the last, cut-short epoch


COMFORMER_SETS = (
    *M2F_SETS[:1],
    "method.name=comformer",
    *M2F_SETS[2:],
    "model.mask2former.mask_activation=softmax",
    "model.mask2former.background=false",
    "model.mask2former.inference=comformer",
)


def test_comformer_losses_are_the_official_total_with_pseudo_labels_and_kd():
    from incseg.comformer_losses import (
        comformer_criterion,
        pseudo_labels,
        targets_from_label_map,
        weighted_total,
    )
    from incseg.methods.comformer import CoMFormer
    from incseg.models.mask2former.segmenter import QueryOutput
    from incseg.protocol import get_setting, step_info

    info = step_info(get_setting("voc", "15-5"), 1)
    net = model((16, 5), background=False, mask_activation="softmax")
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(1, 21, (2, 64, 64))
    labels[:, :8] = 0  # background, which the old model claims below
    # The old model's prediction: query 0 says class index 2 (channel 3) on the top rows, the
    # others no-object.
    logits = torch.full((2, 6, 16), -5.0)
    logits[:, 1:, 15], logits[:, 0, 2] = 5.0, 5.0
    masks = torch.full((2, 6, 16, 16), -5.0)
    masks[:, 0, :2] = 5.0
    old = QueryOutput(logits, masks, [], (64, 64), 1)
    method = CoMFormer(num_points=64)
    torch.manual_seed(3)
    terms = method.losses(net(images), old, labels, info)
    assert set(terms) == {"ce", "mask", "dice", "kd"}
    # the same through the official pieces: the mapper's targets, make_pseudolabels2 on the old
    # masks upsampled to the labels, the criterion with the old logits, the weighted sum
    old_masks = nn.functional.interpolate(old.pred_masks, size=(64, 64), mode="bilinear")
    targets = [
        pseudo_labels(old.pred_logits[b], old_masks[b], targets_from_label_map(labels[b]))
        for b in range(2)
    ]
    for b, target in enumerate(targets):  # the claimed background became an old-class mask
        assert len(target["labels"]) == len(targets_from_label_map(labels[b])["labels"]) + 1
        assert target["labels"][-1] == 2 and bool(target["masks"][-1][:8].all())
    torch.manual_seed(3)
    raw = comformer_criterion(
        net(images).as_dict(), targets, 15, old.pred_logits, method.comformer_weights(10.0)
    )
    expected = weighted_total(raw, method.comformer_weights(10.0))
    assert torch.allclose(sum(terms.values()), expected, rtol=1e-5)
    assert torch.allclose(terms["kd"], 10.0 * raw["loss_kd"])


@pytest.fixture(scope="module")
def comformer_run(tiny_config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("comformer") / "run"
    return out, run_method(tiny_config_path, out, *COMFORMER_SETS)


def test_a_tiny_comformer_run_reports_every_step_and_resumes_exactly(comformer_run, tmp_path):
    out, args = comformer_run
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert len(steps) == 2 and "kd" in steps[1]["losses"][0] and "kd" not in steps[0]["losses"][0]
    check_exact_resume(out, args, tmp_path)


def test_comformer_and_its_ft_share_step_0_but_not_later_steps(tmp_path):
    from incseg.engine.adopt import shared_steps_key

    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {architecture: mask2former, mask2former: {background: false}}\n"
        "method: {name: comformer}\n"
    )
    comformer = load_config(path, ["method.kd_weight=0.5", "method.pseudo=false"])
    ft = load_config(path, ["method.name=comformer_ft"])
    assert shared_steps_key(comformer, 0) == shared_steps_key(ft, 0)
    assert shared_steps_key(comformer, 1) != shared_steps_key(ft, 1)
    other = load_config(path, ["method.name=comformer_ft", "method.focal_gamma=2"])
    assert shared_steps_key(other, 0) != shared_steps_key(ft, 0)  # another step-0 criterion
    m2f = load_config(path, ["method.name=m2f_ft"])
    assert shared_steps_key(m2f, 0) != shared_steps_key(ft, 0)


def test_mib_on_mask2former_is_the_unbiased_criterion_of_comformers_code():
    from incseg.comformer_losses import (
        CoMFormerWeights,
        comformer_criterion,
        targets_from_label_map,
        weighted_total,
    )
    from incseg.methods.comformer import MaskMiB
    from incseg.models.mask2former.segmenter import QueryOutput
    from incseg.protocol import get_setting, step_info

    info = step_info(get_setting("voc", "15-5"), 1)
    net = model((16, 5), background=False, mask_activation="softmax")
    # two classes an image: four of the six queries target no-object, where UCE differs
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64)) * 8
    old = QueryOutput(torch.randn(2, 6, 16), torch.randn(2, 6, 16, 16), [], (64, 64), 1)
    method = MaskMiB(num_points=64)
    torch.manual_seed(5)
    terms = method.losses(net(images), old, labels, info)
    assert set(terms) == {"ce", "mask", "dice", "kd"}
    weights = CoMFormerWeights(kd_weight=200.0, kd_reweight_gamma=None, uce=True, num_points=64)
    targets = [targets_from_label_map(label) for label in labels]
    torch.manual_seed(5)
    raw = comformer_criterion(net(images).as_dict(), targets, 15, old.pred_logits, weights)
    assert torch.allclose(sum(terms.values()), weighted_total(raw, weights), rtol=1e-5)
    # the same draws without the unbiased class loss: only the class term differs
    torch.manual_seed(5)
    plain = comformer_criterion(
        net(images).as_dict(), targets, 15, old.pred_logits, CoMFormerWeights(num_points=64)
    )
    assert not torch.allclose(raw["loss_ce"], plain["loss_ce"])
    assert torch.equal(raw["loss_dice"], plain["loss_dice"])
