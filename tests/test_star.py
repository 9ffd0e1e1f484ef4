"""STAR / STAR-M: the old model's raw-logit prediction, the feature-grid labels, the replay
schedule by hand, the replayed features, every loss term against a literal re-statement of the
official code, the stored statistics (both noise variants), and end to end through ``cli.main``
with an exact resume of a step with a memory."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.method_runs import check_exact_resume, run_method
from helpers.step_data import FakeData

from incseg.engine.checkpoint import load_checkpoint
from incseg.methods.star import (
    STAR,
    grid_sample_labels,
    ocfm_loss,
    old_prediction,
    replayed_features,
    sad_loss,
)
from incseg.models import build_segmenter
from incseg.models.segmenter import SegmenterOutput
from incseg.protocol import get_setting, step_info

STAR_SETS = ("method.name=star", "model.architecture=star", "protocol.labels=plop")


def test_the_old_prediction_thresholds_raw_logits():
    logits = torch.tensor([[0.4, 0.6], [0.4, 0.3], [2.0, 1.0]]).t().reshape(1, 2, 1, 3)
    # sigmoid(0.4) = 0.60 > 0.5, but the official threshold is on the logit (T:398-401).
    assert old_prediction(logits).tolist() == [[[2, 0, 1]]]


def test_grid_labels_are_the_cell_centres():
    labels = torch.arange(32 * 32).reshape(1, 32, 32)
    sampled = grid_sample_labels(labels, (2, 2))
    assert sampled.tolist() == [[[8 * 32 + 8, 8 * 32 + 24], [24 * 32 + 8, 24 * 32 + 24]]]
    big = torch.zeros(1, 512, 512)
    assert grid_sample_labels(big, (32, 32)).shape == (1, 32, 32)


def test_replayed_features_by_hand_and_against_the_official_draws():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    norms = torch.tensor([[2.0, 3.0], [0.0, 0.0]])  # mean, std
    still = replayed_features(
        prototypes, norms, torch.zeros(2, 2), torch.tensor([2, 1]), torch.Generator().manual_seed(0)
    )
    assert still.tolist() == [[2.0, 0.0], [2.0, 0.0], [0.0, 3.0]]
    noise, norms = torch.rand(2, 2), torch.tensor([[2.0, 3.0], [0.5, 0.1]])
    ours = replayed_features(
        prototypes, norms, noise, torch.tensor([3, 2]), torch.Generator().manual_seed(4)
    )
    gen, rows = torch.Generator().manual_seed(4), []
    for c, n in enumerate((3, 2)):  # T:406-420 restated, one class after the other
        f = prototypes[c].reshape(1, -1, 1, 1).repeat(1, 1, n, 1)
        f = f + torch.randn(f.shape, generator=gen) * noise[c].reshape(1, -1, 1, 1)
        f = f * (torch.randn(f.shape, generator=gen) * norms[1, c] + norms[0, c])
        rows.append(f[0, :, :, 0].t())
    torch.testing.assert_close(ours, torch.cat(rows))


def official_pkd(features, old_features, region):
    """models/loss.py:94-107 restated."""
    m = F.interpolate(
        region.unsqueeze(1).float(), size=features.shape[2:], mode="bilinear", align_corners=False
    )
    loss = F.mse_loss(features, old_features, reduction="none")
    return (loss * m).sum() / (m.sum() * features.shape[1])


def official_cont(features, logit, label, prev_prototypes, n_old):
    """models/loss.py:110-135 restated (n_old counts the background, as the official's)."""
    target = torch.zeros_like(logit)
    for c in label.unique():
        if c in (0, 255):
            continue
        target[:, int(c) - n_old] = (label == int(c)).float()
    small = F.interpolate(target, size=features.shape[2:], mode="bilinear", align_corners=False)
    centre = F.normalize(features, p=2, dim=1).unsqueeze(1) * small.unsqueeze(2)
    centre = F.normalize(centre.sum(dim=[0, 3, 4]), p=2, dim=1)
    dist = torch.norm(centre.unsqueeze(0) - prev_prototypes.unsqueeze(1), p=2, dim=2)
    return (1 / dist.min(0).values).mean()


def test_ocfm_and_sad_match_the_official_losses():
    torch.manual_seed(0)
    features, old = torch.rand(2, 6, 4, 4), torch.rand(2, 6, 4, 4)
    region = torch.rand(2, 16, 16) > 0.6
    torch.testing.assert_close(
        ocfm_loss(features, old, region), official_pkd(features, old, region)
    )
    assert float(ocfm_loss(features, old, torch.zeros(2, 16, 16, dtype=torch.bool))) == 0.0
    label = torch.randint(0, 3, (2, 16, 16)) * 8  # 0, 8 (absent: 17, 18 only) or 16
    label = torch.where(label == 16, 17, label).masked_fill(label == 8, 0)
    label[0, 0] = 255
    onehot = torch.stack([(label == c).float() for c in (17, 18)], dim=1)
    prototypes = F.normalize(torch.randn(16, 6), dim=1)
    ours = sad_loss(features, onehot, prototypes)
    torch.testing.assert_close(
        ours, official_cont(features, torch.zeros(2, 2, 16, 16), label, prototypes, 17)
    )
    # Class 18 is absent: its centre is 0, at distance 1 from every unit prototype.
    alone = sad_loss(features, onehot[:, 1:], prototypes)
    assert math.isclose(float(alone), 1.0, rel_tol=1e-6)


def star_model(channels=(16, 1)):
    torch.manual_seed(0)
    return build_segmenter("tiny", channels, head_channels=6, architecture="star")


def test_the_schedule_by_hand():
    info = step_info(get_setting("voc", "15-1"), 1)  # classes 1..15 old, 16 new
    for mode, per_iteration, extra, numbers in (
        ("overlap", [6, 0] + [0] * 13, 99 / 50 - 0.5, [124.0, 40, 10] + [0] * 13 + [7]),
        ("disjoint", [13, 3] + [0] * 13, 2.0, [150.0, 60, 30] + [20] * 13 + [7]),
    ):
        star = STAR(mode=mode)
        star.stats = {"numbers": torch.tensor([100.0, 40, 10] + [0] * 13, dtype=torch.float64)}
        predicted = torch.tensor([50.0, 20, 20] + [20] * 13, dtype=torch.float64)
        labelled = torch.zeros(17, dtype=torch.float64)
        labelled[16] = 7
        star.end_scan({"predicted": predicted, "labelled": labelled}, info)
        star.prepare_step(FakeData([], batches_per_epoch=3), info, None, None)
        assert star.schedule["per_iteration"].tolist() == per_iteration
        assert star.schedule["extra_bg_ratio"] == pytest.approx(extra)
        assert star.schedule["numbers"].tolist() == pytest.approx(numbers)


def official_mbce(logits, label, fake_logits, bg_logits, n_old, n_new, pos_weight, w_fake, w_bg):
    """T:431-455 restated: WBCELoss on the real pixels, on the replayed and the background
    features against 0, mixed by their weights."""
    target = torch.zeros_like(logits[:, -n_new:])
    for c in label.unique():
        if c in (0, 255):
            continue
        target[:, int(c) - n_old] = (label == int(c)).float()
    weight = torch.full([n_new], pos_weight).view(-1, 1, 1)
    ori = F.binary_cross_entropy_with_logits(
        logits[:, -n_new:], target, pos_weight=weight, reduction="none"
    ).mean([0, 2, 3])
    zeros = lambda z: F.binary_cross_entropy_with_logits(z, torch.zeros_like(z), reduction="none")
    fake = zeros(fake_logits).mean([0, 2, 3])
    extra = zeros(bg_logits).mean([0, 2, 3])
    return (ori + fake * w_fake + extra * w_bg) / (1 + w_bg + w_fake)


def test_the_step_loss_matches_the_official_terms():
    torch.manual_seed(0)
    info = step_info(get_setting("voc", "15-1"), 1)
    model = star_model((16, 1))
    star = STAR()
    star.begin_step(info, model)
    protos = F.normalize(torch.randn(15, 6), dim=1)
    star.stats = {
        "prototypes": protos,
        "norms": torch.tensor([[2.0] * 15, [0.3] * 15]),
        "noise": torch.full((15, 6), 0.1),
    }
    star.schedule = {"per_iteration": torch.tensor([2, 0, 1] + [0] * 12), "extra_bg_ratio": 0.7}
    state = star._generator.get_state()
    head, old_head = torch.rand(2, 6, 4, 4, requires_grad=True), torch.rand(2, 6, 4, 4)
    logits = torch.randn(2, 16, 16, 16, requires_grad=True)
    old_logits = torch.randn(2, 15, 16, 16) - 2.5  # some pixels predicted background
    raw = torch.randint(0, 17, (2, 16, 16))
    label = torch.where(raw == 16, 16, 0).masked_fill(raw == 3, 255)
    terms = star.losses(
        SegmenterOutput(logits, {"head": head}),
        SegmenterOutput(old_logits, {"head": old_head}),
        label,
        info,
    )
    # The official computation on the same draws.
    gen = torch.Generator()
    gen.set_state(state)
    fake = replayed_features(
        protos, star.stats["norms"], star.stats["noise"], star.schedule["per_iteration"], gen
    )
    new = model.classifiers[-1]
    fake_logits = F.conv2d(fake.t()[None, :, :, None], new.weight, new.bias)
    pred = old_prediction(old_logits)
    # 8::16 for 512 px and a 32-cell grid; 2::4 here (16 px, 4 cells).
    region = torch.logical_and(pred == 0, label == 0)[:, 2::4, 2::4]
    extra_bg = head.permute(1, 0, 2, 3)[:, region].unsqueeze(0).unsqueeze(3)
    bg_logits = F.conv2d(extra_bg, new.weight, new.bias)
    cells = 2 * 4 * 4
    w_bg, w_fake = 0.7 * float(region.sum()) / cells, fake.shape[0] / cells
    mbce = official_mbce(logits, label, fake_logits, bg_logits, 16, 1, 4.0, w_fake, w_bg)
    pkd = official_pkd(head, old_head, (label == 0) & (pred > 0))
    cont = official_cont(head, logits[:, -1:], label, protos, 16)
    torch.testing.assert_close(terms["mbce"], mbce.sum())
    torch.testing.assert_close(terms["pkd"], 5 * pkd)
    torch.testing.assert_close(terms["cont"], 0.05 * cont)


def official_statistics(model, batches, n_old, n_new, prev_prototypes=None):
    """B:169-278 restated for one step: prototypes, norms (mean, std) and noise."""
    prototypes = torch.zeros(n_new, 6)
    norms = {k: [] for k in range(n_new)}
    noise, cnt = torch.zeros(n_new, 6), torch.zeros(n_new)
    model.eval()
    for images, label in batches:
        x = model(images, features=("head",)).features["head"]
        small = grid_sample_labels(label, x.shape[-2:])
        unit = F.normalize(x, p=2, dim=1)
        for c in small.unique():
            if c in (0, 255):
                continue
            prototypes[int(c) - n_old - 1] += unit.permute(1, 0, 2, 3)[:, small == c].sum(1)
            norms[int(c) - n_old - 1].append(x.norm(dim=1)[small == c])
    prototypes = F.normalize(prototypes, p=2, dim=1)
    every = prototypes if prev_prototypes is None else torch.cat([prev_prototypes, prototypes])
    for images, label in batches:
        x = model(images, features=("head",)).features["head"]
        small = grid_sample_labels(label, x.shape[-2:])
        unit = F.normalize(x, p=2, dim=1)
        for c in small.unique():
            if c in (0, 255):
                continue
            k = int(c) - n_old - 1
            dist = unit.permute(1, 0, 2, 3)[:, small == c] - every[k].unsqueeze(1)
            noise[k] += (dist**2).sum(1)
            cnt[k] += (small == c).sum()
    stats = torch.stack(
        [torch.stack([torch.cat(norms[k]).mean(), torch.cat(norms[k]).std()]) for k in range(n_new)]
    ).t()
    return prototypes, stats, torch.sqrt(noise / cnt.unsqueeze(1))


@pytest.mark.parametrize("variant", ["official", "own"])
def test_stored_statistics_match_the_official_passes(variant):
    torch.manual_seed(1)
    info = step_info(get_setting("voc", "15-5"), 1)  # new 16..20
    model = star_model((16, 5))
    batches = []
    for _ in range(2):
        label = torch.randint(16, 21, (2, 64, 64))
        label[:, :16] = 0
        batches.append((torch.randn(2, 3, 64, 64), label))
    star = STAR(noise=variant)
    old = F.normalize(torch.randn(15, 6), dim=1)
    star.stats = {
        "prototypes": old,
        "norms": torch.ones(2, 15),
        "noise": torch.ones(15, 6),
        "numbers": torch.ones(16, dtype=torch.float64),
    }
    star.schedule = {"numbers": torch.arange(21, dtype=torch.float64)}
    with torch.no_grad():
        star.after_training(FakeData(batches), info, model)
        ref = official_statistics(model, batches, 15, 5, old if variant == "official" else None)
    torch.testing.assert_close(star.stats["prototypes"][15:], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(star.stats["prototypes"][:15], old)
    torch.testing.assert_close(star.stats["norms"][:, 15:], ref[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(star.stats["noise"][15:], ref[2], atol=1e-5, rtol=1e-4)
    assert star.stats["numbers"].tolist() == list(range(21))


def test_prediction_has_no_background_channel():
    model = star_model((16,)).eval()
    out = model(torch.randn(1, 3, 32, 32))
    assert out.logits.shape[1] == 15 and model.scores(out.logits).shape[1] == 16


@pytest.fixture(scope="module")
def star_run(tiny_config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("star") / "run"
    sets = (*STAR_SETS, "method.memory_size=6", "protocol.setting=15-1", "protocol.last_step=2")
    return out, run_method(tiny_config_path, out, *sets)


def test_a_star_m_run_stores_statistics_for_every_class(star_run):
    out, _ = star_run
    stats = [load_checkpoint(out / f"step_{k}.pt")["method"]["stats"] for k in range(3)]
    assert [s["prototypes"].shape[0] for s in stats] == [15, 16, 17]
    assert [s["numbers"].shape[0] for s in stats] == [16, 17, 18]
    assert torch.equal(stats[2]["prototypes"][:16], stats[1]["prototypes"])
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert set(steps[2]["losses"][0]) == {"mbce", "pkd", "cont"}
    assert all(math.isfinite(v) for s in steps for e in s["losses"] for v in e.values())


def test_an_interrupted_star_m_step_resumes_to_the_same_numbers(star_run, tmp_path):
    out, args = star_run
    check_exact_resume(out, args, tmp_path, kill_at="iteration:2:1:1")


def test_a_later_step_trains_the_new_classifier_at_100x_with_frozen_norms():
    model = star_model((16, 1))
    star, info = STAR(), step_info(get_setting("voc", "15-1"), 1)
    star.begin_step(info, model)
    model.train()
    kinds = (torch.nn.BatchNorm2d, torch.nn.Dropout)
    assert not any(m.training for m in model.modules() if isinstance(m, kinds))
    groups = star.param_groups(model, info)
    assert [g.get("lr_scale", 1) for g in groups] == [1, 10, 10, 100]
    assert all("weight_decay" not in g for g in groups)  # the run's weight decay everywhere
    assert groups[3]["params"] == list(model.classifiers[1].parameters())
    norms = {
        id(p)
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters()
    }
    assert not norms & {id(p) for g in groups for p in g["params"]}
