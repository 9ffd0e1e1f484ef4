"""UCD (uncertainty-aware contrastive distillation) as an add-on: the label resizing, the pairs and
weights, and the loss on hand-computed tensors and against a literal re-statement of the
official v2 code path; end to end through ``cli.main`` with an exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.method_runs import check_exact_resume, run_method

from incseg.config import builtin_configs, config_from_dict, load_config
from incseg.engine.adopt import shared_steps_key
from incseg.methods.ucd import contrastive_pairs, labels_at, pixel_contrastive_loss
from incseg.models.segmenter import SegmenterOutput
from incseg.protocol import get_setting, step_info
from incseg.protocol.labels import make_lut


def test_labels_at_truncates_and_drops_void():
    targets = torch.tensor([[[0, 15, 255, 255]]])  # (1, 1, 4) -> width 2
    labels = labels_at(targets, (1, 2), last=20)
    # bilinear at half resolution (align_corners=False) averages pairs: 7.5 -> 7, 255 -> 0
    assert labels.tolist() == [[[7, 0]]]
    mixed = labels_at(torch.tensor([[[15, 255]]]), (1, 1), last=20)  # 135 -> out of range
    assert mixed.tolist() == [[[0]]]


def official_labels_at(targets, size):
    """``utils.py:264, 267-268`` literally: bilinear resize, cast to int8, negatives and values
    above 20 to 0."""
    label_n = F.interpolate(targets.float().unsqueeze(1), size=size, mode="bilinear")
    label_n = label_n.to(torch.int8)
    label_n[label_n < 0] = 0
    label_n[label_n > 20] = 0
    return label_n[:, 0].long()


def test_labels_at_on_void_kept_255_matches_the_official_int8_cast():
    # 21 -> 10 columns: output column 4 samples source x = 2.1 * 4.5 - 0.5 = 8.95, i.e.
    # 0.05 * column 8 + 0.95 * column 9. Void (255) at column 8 beside background: 12.75 -> 12,
    # a class id made from void, kept by the official code (int8 12 is in 0..20).
    row = torch.zeros(1, 1, 21, dtype=torch.long)
    row[0, 0, 8] = 255
    assert labels_at(row, (1, 10), last=20).tolist() == [[[0, 0, 0, 0, 12, 0, 0, 0, 0, 0]]]
    assert official_labels_at(row, (1, 10)).tolist() == [[[0, 0, 0, 0, 12, 0, 0, 0, 0, 0]]]
    # Under MiB's training labels void is 0 beforehand: the same column gives 0.
    assert labels_at(torch.zeros_like(row), (1, 10), last=20).tolist() == [[[0] * 10]]
    # Random maps of classes 0..20 and void, at sizes that mix them with many weights.
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 21, (3, 37, 29), generator=gen)
    targets[torch.rand(targets.shape, generator=gen) < 0.3] = 255
    for size in [(5, 4), (9, 7), (12, 10)]:
        ours = labels_at(targets, size, last=20)
        assert torch.equal(ours, official_labels_at(targets, size))
        assert bool((ours == 0).any()) and bool((ours > 0).any())


def official_ucd_target(value, labels, labels_old):
    """``dataset/voc.py:152-155, 182-207`` (``masking=True``, ``data_masking="current"``): the
    value the official code gives a dataset label ``value``; ``run.py:93-111`` passes the step's
    classes and the earlier ones for training and validation, every seen class and no old one at
    test."""
    order = [0, *labels_old, *labels]
    inverted_order = {label: order.index(label) for label in order}
    inverted_order[255] = 255
    tmp_labels = [0, *labels, 255]
    return inverted_order[value] if value in tmp_labels else 0


@pytest.mark.parametrize("step", [0, 1, 3])
def test_plop_convention_is_ucds_label_masking(step):
    info = step_info(get_setting("voc", "15-1"), step)
    new, old = list(info.new_classes), list(info.old_classes)
    args = {"train": (new, old), "val": (new, old), "test": (old + new, [])}
    for split, (labels, labels_old) in args.items():
        lut = make_lut(info, split, "plop")
        expected = [official_ucd_target(v, labels, labels_old) for v in range(256)]
        assert lut.tolist() == expected, split
        assert lut[255] == 255 and (step == 0 or lut[old[0]] == (old[0] if split == "test" else 0))


def test_the_ucd_configs_follow_their_sources_conventions():
    names = builtin_configs(with_folders=True)
    official = [n for n in names if n.startswith("voc/") and n.endswith("-mib+ucd")]
    csseg = [n for n in names if n.startswith("seed/mib+ucd_")]
    assert len(official) == 6 and len(csseg) == 6
    assert not [n for n in names if n.startswith("ade/") and "ucd" in n]
    for name, reduction in [*((n, "all") for n in official), *((n, "valid") for n in csseg)]:
        config = load_config(name)
        assert config.protocol.labels == "plop", name
        assert config.method.params["ce_reduction"] == reduction, name
        assert config.method.build().method.ce_reduction == reduction, name
    # Step 0 averages void pixels as ce_reduction says: UCD's and a MiB run that averages over
    # valid pixels do not share a trained step 0; MiB with the same reduction does.
    ucd = load_config(official[0])
    mib = load_config(official[0], ["method.name=mib", "method.ce_reduction=valid"])
    assert shared_steps_key(ucd, 0) != shared_steps_key(mib, 0)
    same = load_config(official[0], ["method.name=mib"])  # keeps the file's MiB keys
    assert same.method.params["ce_reduction"] == "all"
    assert shared_steps_key(ucd, 0) == shared_steps_key(same, 0)


def test_loss_by_hand():
    # Two anchors of class 1, one contrast entry of class 2; weights 1.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.cat([a, torch.tensor([[1.0, 0.0]])])
    la, lc = torch.tensor([1, 1]), torch.tensor([1, 1, 2])
    tau = 0.5
    loss = pixel_contrastive_loss(a, c, la, lc, torch.ones(2, 3), temperature=tau)
    # anchor 0: s = [2, 0, 2]; N = e^2 (entry 2); max 2; positive j=1: s' = -2
    #   term = -2 - log(e^-2 + e^2)
    # anchor 1: s = [0, 2, 0]; N = e^0 = 1; max 2; positive j=0: s' = -2
    #   term = -2 - log(e^-2 + 1)
    t0 = -2 - math.log(math.exp(-2) + math.exp(2))
    t1 = -2 - math.log(math.exp(-2) + 1)
    assert float(loss) == pytest.approx(-(t0 + t1) / 2, rel=1e-6)


def official_v2(f_n, l_n, l_po, f_o, temperature=0.07):
    """utils/utils.py:256-393 (version v2) and loss.py:403-466, restated literally."""
    out_size = f_n.shape[-2:]
    label_n = F.interpolate(l_n.float().unsqueeze(1), size=out_size, mode="bilinear").to(torch.int8)
    label_n[label_n < 0] = 0
    label_n[label_n > 20] = 0
    b, n, h, w = f_n.size()
    f_n = f_n.permute(0, 2, 3, 1).reshape(b, h * w, n)
    mask_new = label_n.view(b * h * w) > 0
    min_new = label_n.view(b * h * w)[mask_new].min()
    label_mix = label_n.squeeze(1)
    label_po = l_po.max(dim=1)[1]
    label_mix[label_mix == 0] = label_po.to(label_mix.dtype)[label_mix == 0]
    lab = label_mix.reshape(b * h * w)
    la = lab[lab > 0].clone()
    lc = torch.cat((la, lab[(lab > 0) & ~mask_new]))
    f_o = f_o.permute(0, 2, 3, 1).reshape(b, h * w, n)
    oa = F.normalize(f_n.reshape(b * h * w, n)[lab > 0], dim=1)
    oc = torch.cat((oa, F.normalize(f_o.reshape(b * h * w, n)[(lab > 0) & ~mask_new], dim=1)))
    oc = oc.detach()
    p = torch.softmax(l_po.permute(0, 2, 3, 1), dim=-1).reshape(b * h * w, -1)
    jm = torch.mm(p[lab > 0], torch.cat((p[lab > 0], p[(lab > 0) & ~mask_new])).T)
    ma = (la >= min_new).float().unsqueeze(1)
    mc = (lc >= min_new).float().unsqueeze(1)
    jm[torch.mm(ma, mc.T) == 1] = 1
    r = torch.eq(la.view(-1, 1), lc.view(-1, 1).T).float()
    mask_p = r.clone()
    mask_p[:, : oa.shape[0]] -= torch.eye(oa.shape[0])
    mask_n = 1 - r
    s = torch.div(torch.mm(oa, oc.T), temperature)
    neg = (torch.exp(s) * mask_n).sum(dim=1, keepdim=True)
    s = s - torch.max(s, dim=1, keepdim=True)[0].detach()
    pos = torch.log(torch.exp(s)) * mask_p * jm - torch.log(torch.exp(s) + neg) * mask_p * jm
    num = mask_p.sum(dim=1)
    return (-torch.div(pos.sum(dim=1)[num != 0], num[num != 0])).mean()


def test_matches_the_official_code_path():
    torch.manual_seed(0)
    f_n, f_o = torch.randn(2, 6, 4, 4, requires_grad=True), torch.randn(2, 6, 4, 4)
    l_po = torch.randn(2, 16, 4, 4) * 3
    targets = torch.zeros(2, 16, 16, dtype=torch.long)
    targets[0, 2:10, 3:12] = 16
    targets[1, 8:16, 0:7] = 18
    targets[1, 0:3] = 255
    reference = official_v2(f_n, targets, l_po, f_o)
    pairs = contrastive_pairs(f_n, f_o, l_po, labels_at(targets, (4, 4), last=20))
    ours = pixel_contrastive_loss(*pairs)
    torch.testing.assert_close(ours, reference)
    (grad_ref,) = torch.autograd.grad(reference, f_n)
    (grad,) = torch.autograd.grad(pixel_contrastive_loss(*pairs), f_n)
    torch.testing.assert_close(grad, grad_ref)
    # The weight-1 override of new-with-new pairs is active (cssegmentation's is not).
    # "New" is >= the smallest ground-truth label at feature resolution, which the bilinear
    # resize can make an old class id at an object's border (here 8, half of 16).
    labels = labels_at(targets, (4, 4), last=20)
    smallest = int(labels[labels > 0].min())
    assert smallest == 8
    _, _, la, lc, weights, offset = pairs
    assert offset == 0
    both_new = (la >= smallest)[:, None] & (lc >= smallest)[None]
    assert both_new.any() and bool((weights[both_new] == 1).all())
    assert bool((weights[~both_new] < 1).all())


def test_no_ground_truth_pixel_gives_zero():
    head = torch.randn(1, 4, 2, 2, requires_grad=True)
    info = step_info(get_setting("voc", "15-5"), 1)
    method = config_from_dict({"method": {"name": "mib+ucd"}}).method.build()
    addon = method.addons[0]
    out = SegmenterOutput(torch.zeros(1, 21, 8, 8), {"head": head, "logits_small": None})
    old = SegmenterOutput(
        torch.zeros(1, 16, 8, 8),
        {"head": torch.randn(1, 4, 2, 2), "logits_small": torch.randn(1, 16, 2, 2)},
    )
    terms = addon.losses(out, old, torch.zeros(1, 8, 8, dtype=torch.long), info)
    assert float(terms["ucd"].detach()) == 0.0
    assert method.features == ("head", "logits_small") and method.needs_old_model


def test_terms_add_to_mibs_with_the_unrelabelled_targets():
    info = step_info(get_setting("voc", "15-5"), 1)
    method = config_from_dict({"method": {"name": "mib+ucd"}}).method.build()
    torch.manual_seed(0)
    logits = torch.randn(2, 21, 16, 16)
    feats = {"head": torch.randn(2, 4, 4, 4), "logits_small": torch.randn(2, 21, 4, 4)}
    old_feats = {"head": torch.randn(2, 4, 4, 4), "logits_small": torch.randn(2, 16, 4, 4)}
    targets = torch.zeros(2, 16, 16, dtype=torch.long)
    targets[:, 4:12, 4:12] = 17
    out, old = (
        SegmenterOutput(logits, feats),
        SegmenterOutput(torch.randn(2, 16, 16, 16), old_feats),
    )
    terms = method.losses(out, old, method.relabel(old, targets, info), info)
    assert set(terms) == {"unce", "unkd", "ucd"} and float(terms["ucd"]) > 0


@pytest.fixture(scope="module")
def ucd_run(tiny_config_path, tmp_path_factory):
    """mib+ucd with the official UCD conventions (the voc/*-mib+ucd configs')."""
    out = tmp_path_factory.mktemp("ucd") / "run"
    sets = ("method.name=mib+ucd", "protocol.labels=plop", "method.ce_reduction=all")
    return out, run_method(tiny_config_path, out, *sets)


def test_a_run_saves_the_official_conventions(ucd_run):
    out, _ = ucd_run
    saved = load_config(out / "config.yaml", saved=True)
    assert saved.protocol.labels == "plop"
    assert saved.method.build().method.ce_reduction == "all"


def test_a_run_logs_the_contrastive_term(ucd_run):
    out, _ = ucd_run
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    losses = steps[1]["losses"]
    assert all("ucd" in epoch and math.isfinite(epoch["ucd"]) for epoch in losses)
    assert any(epoch["ucd"] > 0 for epoch in losses)


def test_an_interrupted_ucd_step_resumes_to_the_same_numbers(ucd_run, tmp_path):
    out, args = ucd_run
    check_exact_resume(out, args, tmp_path)
