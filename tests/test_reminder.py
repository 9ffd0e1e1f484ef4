"""REMINDER (PLOP + class-similarity weighted distillation): the prototypes, the cosine, the
CSW-KD term on hand-computed tensors and against a literal re-statement of the official loss,
the two flattening layouts, and end to end through ``cli.main`` with an exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.method_runs import check_exact_resume, run_method

from incseg.engine.checkpoint import load_checkpoint
from incseg.methods.reminder import (
    batch_prototypes,
    cosine_similarity,
    csw_distillation,
)


def literal_prototypes(features, labels, classes, layout="corrected"):
    """train.py:20-31 restated: upsample, flatten (HEAD's permute, or 7872ac7's transpose),
    masked means."""
    up = F.interpolate(features, labels.shape[-2:], mode="bilinear", align_corners=True)
    dim = up.shape[1]
    flat = (
        up.transpose(1, 3).reshape(-1, dim)
        if layout == "published"
        else up.permute(0, 2, 3, 1).reshape(-1, dim)
    )
    seg = labels.reshape(-1)
    out = torch.zeros(max(classes) + 1, dim)
    for c in classes:
        if (seg == c).any():
            out[c] = flat[seg == c].mean(0)
    return out


@pytest.mark.parametrize("layout", ["corrected", "published"])
def test_batch_prototypes_equal_the_literal_upsampling(layout):
    torch.manual_seed(0)
    features = torch.randn(2, 5, 4, 4)
    labels = torch.randint(0, 4, (2, 13, 13))
    labels[0, :3] = 255
    ours, present = batch_prototypes(features, labels, range(1, 4), layout)
    torch.testing.assert_close(ours, literal_prototypes(features, labels, range(1, 4), layout))
    assert present.tolist() == [False, True, True, True]


def test_batch_prototypes_by_hand():
    # Features already at label size (1x1 -> 2x2 with align_corners=True copies the value).
    features = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]], [[0.0, 2.0], [4.0, 6.0]]]])  # (1, 2, 2, 2)
    labels = torch.tensor([[[1, 1], [2, 255]]])
    means, present = batch_prototypes(features, labels, range(1, 3))
    assert present.tolist() == [False, True, True]
    torch.testing.assert_close(means, torch.tensor([[0.0, 0.0], [2.0, 1.0], [5.0, 4.0]]))


def test_published_layout_pairs_labels_with_transposed_positions():
    features = torch.arange(8.0).reshape(1, 2, 2, 2)
    labels = torch.tensor([[[1, 0], [0, 0]]])  # class 1 at (row 0, col 0) only -> same both ways
    a, _ = batch_prototypes(features, labels, range(1, 2), "corrected")
    b, _ = batch_prototypes(features, labels, range(1, 2), "published")
    torch.testing.assert_close(a, b)
    labels = torch.tensor([[[0, 1], [0, 0]]])  # (row 0, col 1): published reads (row 1, col 0)
    a, _ = batch_prototypes(features, labels, range(1, 2), "corrected")
    b, _ = batch_prototypes(features, labels, range(1, 2), "published")
    assert a[1].tolist() == [1.0, 5.0] and b[1].tolist() == [2.0, 6.0]


def test_cosine_zero_row_is_zero():
    sim = cosine_similarity(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    assert sim.tolist() == [[1.0, 0.0]]


def official_csw(preds_s, preds_t, batch_prototypes, prototypes, seg, mask, delta, t=3.0):
    """utils/loss.py:326-364 restated (without .cuda())."""
    b, _, h, w = preds_s.shape
    preds_s = preds_s.narrow(1, 0, preds_t.shape[1])
    preds_s = preds_s.permute(0, 2, 3, 1).contiguous().view(b * h * w, -1)[mask]
    preds_t = preds_t.permute(0, 2, 3, 1).contiguous().view(b * h * w, -1)[mask]
    seg = seg.view(b * h * w)[mask]
    n = seg.size(0)
    proto = batch_prototypes[seg]
    a = proto / proto.norm(dim=1, keepdim=True)
    c = prototypes / prototypes.norm(dim=1, keepdim=True)
    r = a @ c.T
    r[torch.isnan(r)] = 0
    r = F.softmax(r, dim=-1)
    r[r < (delta / r.size(1))] = 0.0
    preds_s = F.log_softmax(preds_s / t, dim=1)
    preds_t = F.softmax(preds_t / t, dim=1)
    preds_t = (preds_t * r + 10 ** (-7)).detach()
    return t * t * torch.sum(-preds_t * preds_s) / n


@pytest.mark.parametrize("delta", [0.0, 1.0])
def test_csw_matches_the_official_loss(delta):
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 6, 6, requires_grad=True)
    old = torch.randn(2, 5, 6, 6)
    labels = torch.randint(0, 7, (2, 6, 6))
    labels[0, 0] = 255
    now, old_protos = torch.randn(7, 4), torch.randn(5, 4)
    old_protos[3] = 0  # a class without pixels when its prototypes were taken
    mask = (labels.view(-1) < 255) & (labels.view(-1) >= 5)
    ref = official_csw(logits, old, now, old_protos, labels, mask, delta)
    ours = csw_distillation(logits, old, labels, now, old_protos, delta=delta)
    torch.testing.assert_close(ours, ref)
    (g_ref,) = torch.autograd.grad(ref, logits)
    (g,) = torch.autograd.grad(
        csw_distillation(logits, old, labels, now, old_protos, delta=delta), logits
    )
    torch.testing.assert_close(g, g_ref)
    assert g[:, 5:].abs().sum() == 0  # new-class logits get no CSW gradient


def test_csw_by_hand_one_pixel():
    # O = 2 old channels, one new-class pixel; prototypes make the weights softmax([1, 0]).
    logits = torch.tensor([0.0, 0.0, 5.0]).view(1, 3, 1, 1)
    old = torch.tensor([3.0, 0.0]).view(1, 2, 1, 1)
    now = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    old_p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cos with now[2] = [1, 0]
    loss = csw_distillation(logits, old, torch.tensor([[[2]]]), now, old_p)
    w = torch.tensor([1.0, 0.0]).softmax(0)
    q = torch.tensor([1.0, 0.0]).softmax(0) * w + 1e-7
    expected = 9 * -(q * math.log(0.5)).sum()
    torch.testing.assert_close(loss, expected)
    empty = csw_distillation(logits, old, torch.tensor([[[1]]]), now, old_p)
    assert float(empty) == 0.0


@pytest.fixture(scope="module")
def reminder_run(tiny_config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("reminder") / "run"  # POD's 4x4 grid needs maps 4 wide at crop 32
    return out, run_method(tiny_config_path, out, "method.name=reminder", "model.output_stride=8")


def test_a_run_keeps_prototypes_and_logs_the_term(reminder_run):
    out, _ = reminder_run
    p0 = load_checkpoint(out / "step_0.pt")["method"]["prototypes"]
    p1 = load_checkpoint(out / "step_1.pt")["method"]["prototypes"]
    assert p0.shape == (16, 8) and p1.shape == (21, 8)
    assert torch.equal(p1[:16], p0)  # old classes keep the prototypes of their step
    assert p1[16:].abs().sum() > 0
    losses = json.loads((out / "metrics.json").read_text())["steps"][1]["losses"]
    assert all(math.isfinite(e["csw"]) for e in losses) and any(e["csw"] > 0 for e in losses)


def test_an_interrupted_reminder_step_resumes_to_the_same_numbers(reminder_run, tmp_path):
    out, args = reminder_run
    check_exact_resume(out, args, tmp_path)


def test_batch_prototypes_non_square_crops():
    torch.manual_seed(1)
    features, labels = torch.randn(3, 6, 5, 3), torch.randint(0, 3, (3, 17, 9))
    ours, _ = batch_prototypes(features, labels, range(3))
    torch.testing.assert_close(ours, literal_prototypes(features, labels, range(3)))
    with pytest.raises(ValueError, match="square"):
        batch_prototypes(features, labels, range(3), "published")
