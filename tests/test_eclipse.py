"""ECLIPSE (``eclipse``) against re-statements of clovaai/ECLIPSE 9266720: the sigmoid focal class
loss (``continual/method_wrapper/loss.py:11-28``), the logit manipulation
(``mask2former_transformer_decoder.py:786-817``), the sigmoid inference
(``maskformer_model.py:372-420``), the copies that start a step (``:694-748``) and the freezing
(``:616-691``); the prompt groups' independence; the config checks; a tiny run through the
command line that resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers.method_runs import check_exact_resume, run_method
from test_query_model import TINY

from incseg.cli import main
from incseg.comformer_losses import comformer_inference
from incseg.eclipse_losses import sigmoid_focal_loss
from incseg.errors import ConfigError
from incseg.models.build import build_segmenter
from incseg.models.mask2former.prompts import expand_deltas, manipulate_logits


def ref_sigmoid_focal_loss(inputs, targets, alpha=10, gamma=2, reduction="mean"):
    """``loss.py:11-28``, restated (``inputs`` ``(B, K + 1, Q)``)."""
    one_hot_targets = F.one_hot(targets.long(), inputs.shape[1]).permute(0, 2, 1).float()
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, one_hot_targets, reduction="none")
    p_t = p * one_hot_targets + (1 - p) * (1 - one_hot_targets)
    loss = alpha * ce_loss * ((1 - p_t) ** gamma)
    if reduction == "mean":
        loss = loss.mean()
    return loss * 50


def ref_sigmoid_to_logit(x):
    x = x.clamp(0.001, 0.999)
    return torch.log(x / (1 - x))


def ref_manipulate(outputs_class, qdims, classes, deltas):
    """The evaluation branch of ``forward_prediction_heads`` (``D:786-817``), restated."""
    outputs_class = outputs_class.clone()
    for n in range(len(qdims) - 1):
        others = list(range(sum(classes[:n]))) + list(range(sum(classes[: n + 1]), sum(classes)))
        if deltas[n] > 0:
            noobj_score = (
                outputs_class[:, qdims[n] : qdims[n + 1], others].sigmoid().sum(2).clamp(0.0, 1.0)
            )
            outputs_class[:, qdims[n] : qdims[n + 1], -1] = ref_sigmoid_to_logit(
                noobj_score * deltas[n]
            )
        elif deltas[n] < 0:
            outputs_class[:, qdims[n] : qdims[n + 1], -1] = ref_sigmoid_to_logit(
                outputs_class[:, qdims[n] : qdims[n + 1], -1].sigmoid() * -deltas[n]
            )
        outputs_class[:, qdims[n] : qdims[n + 1], others] = -10
    return outputs_class


def ref_semantic_inference(mask_cls, mask_pred, num_classes):
    """``maskformer_model.py:372-420`` with SOFTMASK, SOFTCLS, PER_PIXEL, MASK_BG all False and
    thresholds 0, restated; returns the label map."""
    mask_pred = mask_pred.sigmoid()
    scores, labels = mask_cls.sigmoid().max(-1)
    keep = labels.ne(num_classes) & (scores > 0.0)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep]
    cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks
    semseg = torch.zeros(mask_pred.shape[-2:], dtype=torch.long)
    if cur_masks.shape[0] == 0:
        return semseg
    cur_mask_ids = cur_prob_masks.argmax(0)
    for k in range(cur_classes.shape[0]):
        mask_area = (cur_mask_ids == k).sum().item()
        original_area = (cur_masks[k] >= 0.5).sum().item()
        mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
        if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
            if mask_area / original_area < 0.0:
                continue
            semseg[mask] = cur_classes[k].item() + 1
    return semseg


ECLIPSE_SIZES = {"background": False, "prompts": 4, "class_head": "mlp", "inference": "eclipse"}


def eclipse_model(channels=(16, 3, 2), deltas=()):
    torch.manual_seed(0)
    sizes = TINY | ECLIPSE_SIZES | {"logit_deltas": deltas}
    return build_segmenter("tiny", channels, architecture="mask2former", query_sizes=sizes)


def test_sigmoid_focal_loss_matches_the_official():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 9, generator=gen, requires_grad=True)
    classes = torch.randint(0, 9, (3, 7), generator=gen)
    ref_logits = logits.detach().clone().requires_grad_(True)
    mine = sigmoid_focal_loss(logits, classes, 5.0, 1.0)
    ref = ref_sigmoid_focal_loss(ref_logits.transpose(1, 2), classes, alpha=5.0, gamma=1.0)
    torch.testing.assert_close(mine, ref)
    mine.backward()
    ref.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    # by hand: one query, two columns, logit 0 (p = 0.5) on the target column 0: BCE ln 2 on
    # both, (1 - p_t) = 0.5 on both -> 50 * 5 * ln2 * 0.5 (the mean of two equal values)
    one = sigmoid_focal_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), 5.0, 1.0)
    assert one.item() == pytest.approx(50 * 5 * 0.6931471805599453 * 0.5)


@pytest.mark.parametrize("deltas", [[0.1, 0.7, 0.7], [-0.3, -0.6, 0.0], [0.0, 0.5, -0.2]])
def test_logit_manipulation_matches_the_official(deltas):
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(2, 6 + 4 + 4, 16 + 3 + 2 + 1, generator=gen)
    mine = manipulate_logits(logits, [6, 4, 4], [15, 3, 2], deltas)
    ref = ref_manipulate(logits, [0, 6, 10, 14], [15, 3, 2], deltas)
    torch.testing.assert_close(mine, ref)
    assert (mine[:, :6, 15:20] == -10).all() and (mine[:, 6:10, :15] == -10).all()


def test_deltas_are_expanded_as_the_official():
    assert expand_deltas([], 3) == [0.0, 0.0, 0.0]
    assert expand_deltas([0.1, 0.7], 4) == [0.1, 0.7, 0.7, 0.7]
    assert expand_deltas([-0.3, -0.6, 0.2], 2) == [-0.3, -0.6]


def test_sigmoid_inference_matches_the_official():
    gen = torch.Generator().manual_seed(2)
    logits = 2 * torch.randn(2, 8, 6, generator=gen)
    masks = 4 * torch.randn(2, 8, 12, 12, generator=gen)
    mine = comformer_inference(logits, masks, sigmoid=True)
    for b in range(2):
        assert torch.equal(mine[b], ref_semantic_inference(logits[b], masks[b], 5))
    assert mine.unique().numel() > 2


def test_each_query_group_is_independent_of_the_others():
    net = eclipse_model().eval()
    plain = eclipse_model((16,)).eval()  # the same weights, no prompt group
    plain.load_state_dict(
        {k: v for k, v in net.state_dict().items() if k in plain.state_dict()}, strict=True
    )
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, base = net(images), plain(images)
    assert out.pred_masks.shape[1] == 6 + 4 + 4 and out.pred_logits.shape[-1] == 15 + 3 + 2 + 1
    # the base queries' masks do not see the prompts; their own class logits are unchanged
    torch.testing.assert_close(out.pred_masks[:, :6], base.pred_masks, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pred_logits[:, :6, :15], base.pred_logits[:, :, :15])
    # in training only the last group runs, as in evaluation, with two predictions (the
    # decoder alone in training mode: the backbone's batch norm would change the features)
    net.predictor.train()
    with torch.no_grad():
        trained = net(images)
    assert trained.pred_masks.shape[1] == 4 and len(trained.aux_outputs) == 1
    net.eval()
    torch.testing.assert_close(trained.pred_masks, out.pred_masks[:, 10:], rtol=1e-5, atol=1e-5)


def test_a_step_starts_from_the_official_copies_and_trains_only_its_pieces():
    from incseg.methods.eclipse import ECLIPSE
    from incseg.protocol import get_setting, step_info

    net = eclipse_model((16,))
    net.add_classifier(5)
    info = step_info(get_setting("voc", "15-5"), 1)
    method = ECLIPSE()
    method.init_new_classifier(net, info)
    decoder = net.predictor
    mean = decoder.query_feat.weight.mean(0)
    assert torch.equal(decoder.prompt_feat[0].weight, mean.expand(4, -1))
    assert all(
        torch.equal(e.weight, decoder.query_embed.weight.mean(0).expand(4, -1))
        for e in decoder.prompt_embed[0]
    )
    x = torch.randn(3, 16)
    torch.testing.assert_close(decoder.prompt_mask_embed[0](x), decoder.mask_embed(x))
    # the new classes score as no-object at first (copy_no_obj_weights: last layer repeated)
    new, no_object = net.classifiers[1](x), decoder.class_embed.no_object(x)
    torch.testing.assert_close(new, no_object.expand(-1, 5))
    method.begin_step(info, net)
    trainable = {
        n.split(".")[1] if n.startswith("predictor.") else n
        for n, p in net.named_parameters()
        if p.requires_grad
    }
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    assert names and all(
        n.startswith(
            (
                "predictor.class_embed.classifiers.1.",
                "predictor.class_embed.no_object.",
                "predictor.prompt_",
            )
        )
        for n in names
    ), names
    assert trainable == {"class_embed", "prompt_feat", "prompt_embed", "prompt_mask_embed"}


def test_the_config_checks_prompts_against_the_method(tmp_path):
    from incseg.config import load_config
    from incseg.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("model: {architecture: mask2former}\nmethod: {name: eclipse}\n")
    with pytest.raises(ConfigError, match="model.mask2former.prompts: 0; method 'eclipse'"):
        load_config(path)
    assert load_config(path, ["model.mask2former.prompts=10"]).model.mask2former.prompts == 10
    with pytest.raises(ConfigError, match="prompts: 10; only method 'eclipse'"):
        load_config(path, ["model.mask2former.prompts=10", "method.name=m2f_ft"])
    with pytest.raises(ConfigError, match=r"logit_deltas\[1\]: expected float"):
        load_config(
            path, ["model.mask2former.prompts=10", "model.mask2former.logit_deltas=[0.1, x]"]
        )


ECLIPSE_SETS = (
    "model.architecture=mask2former",
    "method.name=eclipse",
    (
        "model.mask2former={num_queries: 6, hidden_dim: 16, nheads: 2, dec_layers: 2, "
        "dim_feedforward: 16, conv_dim: 32, mask_dim: 16, enc_layers: 1, enc_dim_feedforward: 16, "
        "background: false, prompts: 4, class_head: mlp, inference: eclipse, "
        "logit_deltas: [0.1, 0.7]}"
    ),
    "method.num_points=64",
    "train.optimizer=adamw",
    "train.weight_decay=0.05",
    "train.lr=0.001",
    "train.lr_incremental=0.001",
    # Mask2Former's full-model clipping at the official 0.01: with every old weight frozen after
    # step 0, the exact resume below checks that their step-0 gradients never enter the norm
    "train.clip_grad_norm=0.01",
)


def test_a_tiny_eclipse_run_freezes_the_old_model_and_resumes_exactly(tiny_config_path, tmp_path):
    from incseg.engine.checkpoint import load_checkpoint

    out = tmp_path / "first"
    args = run_method(tiny_config_path, out, *ECLIPSE_SETS)
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert len(steps) == 2 and {"ce", "mask", "dice"} == set(steps[1]["losses"][0])
    first, second = (
        load_checkpoint(out / "step_0.pt")["model"],
        load_checkpoint(out / "step_1.pt")["model"],
    )
    frozen = [
        k for k in first if "running" not in k and "num_batches" not in k and "no_object" not in k
    ]
    assert frozen and all(torch.equal(first[k], second[k]) for k in frozen)  # nothing old trained
    assert any(k.startswith("predictor.prompt_feat.0") for k in second)
    check_exact_resume(out, args, tmp_path)
    _eval_with_other_deltas(out)


def _eval_with_other_deltas(out) -> None:
    """``incseg eval --set`` re-evaluates with the scripts' evaluation deltas: the model it builds
    holds them and its table is the one of the checkpoint with its config changed by hand."""
    import io
    from contextlib import redirect_stdout

    from incseg.cli import _eval_overrides
    from incseg.engine.checkpoint import load_checkpoint
    from incseg.engine.evaluate import evaluate_checkpoint
    from incseg.engine.model_io import restore_step

    checkpoint = load_checkpoint(out / "step_1.pt")
    _eval_overrides(checkpoint["config"], ["model.mask2former.logit_deltas=[0.0, -0.1]"])
    assert restore_step(checkpoint)[2].predictor.deltas == [0.0, -0.1]
    report, _ = evaluate_checkpoint(checkpoint)
    text = io.StringIO()
    with redirect_stdout(text):
        code = main(
            [
                "eval",
                str(out),
                "--no-progress",
                "--set",
                "model.mask2former.logit_deltas=[0.0, -0.1]",
            ]
        )
    assert code == 0
    assert "changed: model.mask2former.logit_deltas=[0.0, -0.1]" in text.getvalue()
    assert f"all (1-20) {100 * report.miou_all:5.1f}" in text.getvalue()
    with pytest.raises(ConfigError, match=r"'model.mask2former.prompts' is not a key that acts at"):
        _eval_overrides(checkpoint["config"], ["model.mask2former.prompts=3"])
    with pytest.raises(ConfigError, match=r"--set .*logit_deltas\[0\]: must be in \[-10, 10\]"):
        _eval_overrides(checkpoint["config"], ["model.mask2former.logit_deltas=[-11]"])
