"""SSUL / SSUL-M: the label shift and the unknown class, the pseudo-labels, the loss against a
literal re-statement of the official one, the weight transfer, what a step > 0 trains, the memory
labels, the prediction, the saliency maps, and end to end through ``cli.main`` with an exact
resume of a step with a memory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.method_runs import check_exact_resume, run_method, step_training_images

from incseg.cli import main
from incseg.data import ShapesSource, StepDataset
from incseg.data.transforms import test_transform as full_image
from incseg.engine.train import Optimisation
from incseg.methods.ssul import (
    SSUL,
    bce_all_channels,
    pseudo_labels,
    shift_labels,
    transfer_unknown,
)
from incseg.models import build_segmenter
from incseg.protocol import get_setting, make_lut, step_info

SSUL_SETS = ("method.name=ssul", "model.architecture=ssul", "protocol.labels=ssul")


def voc_step(setting: str, step: int):
    return step_info(get_setting("voc", setting), step)


def test_shift_puts_unknown_first_and_keeps_void():
    targets = torch.tensor([[[0, 254, 3, 255, 1]]], dtype=torch.uint8)
    assert shift_labels(targets).tolist() == [[[1, 0, 4, 255, 2]]]


def test_pseudo_labels_by_hand():
    # SSUL channels: 0 unknown, 1 background, 2.. objects; four pixels in a row.
    labels = torch.tensor([[[0, 1, 1, 4, 255]]])
    logit = math.log(0.8 / 0.2)  # sigmoid 0.8
    low = math.log(0.6 / 0.4)  # sigmoid 0.6
    old = torch.full((1, 4, 1, 5), -5.0)
    old[0, 3, 0, 0] = logit  # unknown pixel, class channel 3 at 0.8 -> 3
    old[0, 1, 0, 1] = logit  # background pixel, the old background wins -> stays 1
    old[0, 2, 0, 2] = low  # background pixel, class 2 at 0.6 < 0.7 -> stays 1
    old[0, 2, 0, 3] = logit  # a current-class pixel is never relabelled
    old[0, 2, 0, 4] = logit  # nor a void one
    assert pseudo_labels(labels, old, 0.7).tolist() == [[[3, 1, 1, 4, 255]]]
    assert pseudo_labels(labels, old, 0.55)[0, 0, 2] == 2


def official_bce(logits, labels):
    """utils/loss.py:24-56 restated: one-hot over all channels (void rows zero), BCE summed over
    channels, mean over the pixels whose one-hot row is not empty."""
    n_cl = logits.shape[1]
    targets = labels.clone()
    targets[targets == 255] = n_cl  # an extra column, dropped
    onehot = F.one_hot(targets, n_cl + 1).float().permute(0, 3, 1, 2)[:, :n_cl]
    loss = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").sum(1)
    return torch.masked_select(loss, onehot.sum(1) != 0).mean()


def test_bce_matches_the_official_one_hot_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5, 7, requires_grad=True)
    labels = torch.randint(0, 6, (2, 5, 7))
    labels[0, :2] = 255
    ours, ref = bce_all_channels(logits, labels), official_bce(logits, labels)
    torch.testing.assert_close(ours, ref)
    g1 = torch.autograd.grad(ours, logits)[0]
    g2 = torch.autograd.grad(official_bce(logits, labels), logits)[0]
    torch.testing.assert_close(g1, g2)


def test_bce_by_hand_and_all_void():
    # One pixel, logits (0, 0), label 1: ln 2 for each channel.
    loss = bce_all_channels(torch.zeros(1, 2, 1, 1), torch.tensor([[[1]]]))
    assert math.isclose(float(loss), 2 * math.log(2), rel_tol=1e-6)
    assert float(bce_all_channels(torch.zeros(1, 2, 1, 1), torch.tensor([[[255]]]))) == 0.0


def ssul_model(channels=(16, 1)):
    torch.manual_seed(0)
    return build_segmenter("tiny", channels, head_channels=8, architecture="ssul")


def test_weight_transfer_copies_the_unknown_head():
    model = ssul_model()
    unknown = model.classifiers[0].unknown
    with torch.no_grad():
        unknown[1].running_mean.uniform_()
        unknown[1].weight.uniform_()
    new = model.add_classifier(3)
    transfer_unknown(model)
    assert torch.equal(new[0].weight, unknown[0].weight)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(new[1], name), getattr(unknown[1], name))
    for row in range(3):
        assert torch.equal(new[3].weight[row], unknown[3].weight[0])
        assert new[3].bias[row] == unknown[3].bias[0]


def test_a_later_step_trains_three_heads_with_frozen_norms():
    model = ssul_model((16, 1, 1))
    method, info = SSUL(), voc_step("15-1", 2)
    method.begin_step(info, model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        f"{head}.{i}.{kind}"
        for head in ("classifiers.2", "classifiers.0.unknown", "classifiers.0.background")
        for i, kind in ((0, "weight"), (3, "weight"), (3, "bias"))
    }
    assert trained == expected
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    groups = method.param_groups(model, info)
    assert [len(g["params"]) for g in groups] == [3, 3, 3]
    assert groups[2]["lr_scale"] == 1e-4
    method.begin_step(voc_step("15-1", 0), model)
    model.train()
    assert all(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_background_lr_stays_at_the_floor(tiny_config_path):
    from incseg.config import load_config
    from incseg.engine.runtime import Runtime

    config = load_config(tiny_config_path, [*SSUL_SETS, "train.lr_min=1e-6"])
    model, method, info = ssul_model((16, 1)), SSUL(), voc_step("15-1", 1)
    method.begin_step(info, model)
    opt = Optimisation.for_step(
        model, config.train, 1, 10, Runtime.of(config), method.param_groups(model, info)
    )
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.optimizer.param_groups])
        opt.optimizer.step()  # no gradients: nothing moves
        opt.scheduler.step()
    base = config.train.lr_incremental
    assert lrs[0] == pytest.approx([base, base, 1e-6])
    assert all(row[2] == pytest.approx(1e-6) for row in lrs)  # base * 1e-4 = 1e-6: the floor
    assert lrs[9][0] == pytest.approx(max(base * 0.1**0.9, 1e-6))


def test_memory_labels_keep_the_official_shift():
    info = voc_step("15-1", 1)  # channels 0..16; class c is channel c
    raw = torch.tensor([0, 1, 5, 16, 17, 255])
    unshifted = SSUL().memory_lut(info)[raw]
    assert unshifted.tolist() == [254, 0, 4, 15, 254, 255]
    # After the shift: background -> unknown, class c -> SSUL channel c (the class before it).
    assert shift_labels(unshifted).tolist() == [0, 1, 5, 16, 0, 255]
    shifted = SSUL(memory_labels="shifted").memory_lut(info)[raw]
    assert shift_labels(shifted).tolist() == [0, 2, 6, 17, 0, 255]


def test_prediction_adds_the_unknown_to_the_background():
    model = ssul_model()
    logit = lambda p: math.log(p / (1 - p))
    logits = torch.full((1, 17, 1, 2), -9.0)
    logits[0, 0, 0, 0], logits[0, 1, 0, 0], logits[0, 2, 0, 0] = logit(0.4), logit(0.3), logit(0.6)
    logits[0, 0, 0, 1], logits[0, 1, 0, 1], logits[0, 2, 0, 1] = logit(0.2), logit(0.3), logit(0.6)
    scores = model.scores(logits)
    assert scores.shape == (1, 16, 1, 2)
    assert scores.argmax(1).tolist() == [[[0, 1]]]  # 0.4 + 0.3 > 0.6; 0.2 + 0.3 < 0.6


def test_salient_background_becomes_unknown():
    source = ShapesSource(6, 32, 0, "train")
    info = voc_step("15-5", 1)  # 16..20 new; 1..15 old -> background in training labels
    lut = make_lut(info, "train", "ssul")
    plain = StepDataset(source, np.arange(6), lut, full_image(None))
    marked = StepDataset(source, np.arange(6), lut, full_image(None), unknown_from="saliency")
    for i in range(6):
        raw = source.labels[i]
        label, target = plain[i][1], marked[i][1]
        objects_as_background = (raw > 0) & (label == 0)
        assert torch.equal(target == 254, objects_as_background)
        assert torch.equal(target[target != 254], label[target != 254])
    everything = StepDataset(source, [0], lut, full_image(None), unknown_from="background")
    assert torch.equal(everything[0][1] == 254, plain[0][1] == 0)


def test_missing_saliency_maps_stop_before_training(voc_config_path, tmp_path, capsys):
    args = ["run", str(voc_config_path), "--out", str(tmp_path / "r"), "--no-progress"]
    for value in SSUL_SETS:
        args += ["--set", value]
    assert main(args) == 2
    assert "data.saliency is not set" in capsys.readouterr().err
    maps = tmp_path / "sal"
    maps.mkdir()
    assert main([*args, "--set", f"data.saliency={maps}"]) == 2
    err = capsys.readouterr().err
    assert "saliency map(s) missing" in err and str(maps) in err and "saliency_map.zip" in err
    assert not (tmp_path / "r" / "step_0.pt").exists()


GREY = np.array([[0, 10, 200], [255, 1, 0]], dtype=np.uint8)


def official_saliency(path):
    """The official reading, literally: ``Image.open`` with no conversion (clovaai/SSUL
    datasets/voc.py:123), then ``np.array(sal, dtype=self.target_type)`` with target_type uint8
    (utils/ext_transforms.py:288, 303)."""
    from PIL import Image

    return np.array(Image.open(path), dtype="uint8")


def _saliency_png(tmp_path, mode):
    """A 2 x 3 map of ``GREY`` saved as a PNG of ``mode``; a palette map holds indices 0..5 whose
    colours are anything but the indices, so reading colours and reading indices differ."""
    from PIL import Image

    path = tmp_path / f"{mode}.png"
    if mode == "P":
        img = Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3), "P")
        img.putpalette([0, 0, 0, 255, 255, 255, 9, 9, 9, 0, 0, 0, 100, 0, 0, 3, 3, 3])
    else:
        img = Image.fromarray(GREY, "L").convert(mode)
    img.save(path)
    assert Image.open(path).mode == mode
    return path


@pytest.mark.parametrize("mode", ["L", "P", "1"])
def test_a_one_channel_saliency_map_reads_as_the_official_code_reads_it(tmp_path, mode):
    from incseg.data.files import read_saliency

    path = _saliency_png(tmp_path, mode)
    got = read_saliency(path)
    assert got.dtype == np.uint8 and np.array_equal(got, official_saliency(path))
    expected = {"L": GREY, "P": np.arange(6).reshape(2, 3), "1": (GREY >= 128).astype(np.uint8)}
    assert np.array_equal(got, expected[mode])  # P: palette indices, not grey values of colours


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA"])
def test_a_saliency_map_with_several_channels_is_refused(tmp_path, mode):
    from incseg.data.files import read_saliency
    from incseg.errors import DataError

    path = _saliency_png(tmp_path, mode)
    assert official_saliency(path).shape == (2, 3, len(mode))  # voc.py:140 cannot use it
    with pytest.raises(DataError) as err:
        read_saliency(path)
    assert str(err.value).startswith(
        f"{path}: saliency map has {len(mode)} channels (mode {mode}); SSUL reads a map "
        "unconverted and needs one channel"
    )


def test_a_16_bit_saliency_map_reads_in_range_and_is_refused_past_255(tmp_path):
    from PIL import Image

    from incseg.data.files import read_saliency
    from incseg.errors import DataError

    Image.fromarray(GREY.astype(np.uint16)).save(tmp_path / "ok.png")
    assert np.array_equal(
        read_saliency(tmp_path / "ok.png"), official_saliency(tmp_path / "ok.png")
    )
    Image.fromarray(np.array([[0, 256]], dtype=np.uint16)).save(tmp_path / "wide.png")
    assert official_saliency(tmp_path / "wide.png").tolist() == [[0, 0]]  # wrapped round
    with pytest.raises(
        DataError, match=r"wide.png: saliency map \(mode I;16\) holds values 0..256"
    ):
        read_saliency(tmp_path / "wide.png")


@pytest.fixture(scope="module")
def ssul_run(tiny_config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ssul") / "run"
    sets = (*SSUL_SETS, "method.memory_size=6", "protocol.setting=15-1", "protocol.last_step=2")
    return out, run_method(tiny_config_path, out, *sets)


def test_an_ssul_m_run_keeps_and_reports_its_memory(ssul_run):
    out, _ = ssul_run
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert "memory" not in steps[0]
    for step in (1, 2):
        memory = json.loads((out / f"memory_step_{step}.json").read_text())["images"]
        assert len(memory) == 6 == steps[step]["memory"]["images"]
        assert all(e["chosen_for"] in e["classes"] and e["step"] < step for e in memory)
        assert all(1 <= e["chosen_for"] <= 15 + step - 1 for e in memory)
        assert steps[step]["memory"]["summary"].startswith("6 images: ")
        # The step's own images, the memory's (half of every batch) not counted among them.
        assert steps[step]["num_train_images"] == step_training_images(out, step)
    losses = [e["bce"] for s in steps for e in s["losses"]]
    assert all(math.isfinite(v) and v > 0 for v in losses)


def test_an_interrupted_ssul_m_step_resumes_to_the_same_numbers(ssul_run, tmp_path):
    out, args = ssul_run
    check_exact_resume(out, args, tmp_path, kill_at="iteration:2:1:1")  # in step 2's 2nd epoch
    for step in (1, 2):
        name = f"memory_step_{step}.json"
        assert (tmp_path / "run" / name).read_text() == (out / name).read_text()
