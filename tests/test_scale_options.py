"""TensorBoard scalars, channels_last and torch.compile (train.* options for scale)."""

import json

import numpy as np
import pytest
import torch

from incseg.cli import main
from incseg.config import load_config
from incseg.engine import evaluate as evaluation
from incseg.engine import tensorboard
from incseg.engine.checkpoint import load_checkpoint
from incseg.engine.evaluate import evaluate, evaluate_checkpoint
from incseg.engine.model_io import restore_step
from incseg.errors import ConfigError
from incseg.metrics import StepReport


def _run(config_path, out, *sets):
    args = [
        "run",
        str(config_path),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "protocol.last_step=1",
    ]
    for assignment in sets:
        args += ["--set", assignment]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_tensorboard_holds_losses_lr_and_miou_per_step(tiny_config_path, tmp_path):
    metrics = _run(tiny_config_path, tmp_path / "tb", "train.tensorboard=on")
    scalars = _scalars(tmp_path / "tb")
    for step in (0, 1):
        assert {f"step_{step}/train/lr", f"step_{step}/train/total"} <= scalars.keys()
        epoch = metrics["steps"][step]["losses"][0]
        for term, value in epoch.items():  # epoch means equal those in metrics.json
            assert scalars[f"step_{step}/epoch/{term}"] == [(1, pytest.approx(value, rel=1e-6))]
    assert (
        "step_1/train/unkd" in scalars and "step_0/train/unkd" not in scalars
    )  # MiB's KD from step 1
    lrs = [v for _, v in scalars["step_0/train/lr"]]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 0.02  # poly decay from the step's LR
    for part in ("old", "new", "all"):
        assert [s for s, _ in scalars[f"miou/{part}"]] == [0, 1]
    assert scalars["miou/all"][1][1] == pytest.approx(
        100 * metrics["steps"][1]["miou_all"], rel=1e-6
    )


def test_tensorboard_off_writes_nothing(tiny_config_path, tmp_path):
    _run(tiny_config_path, tmp_path / "off", "train.tensorboard=off", "protocol.last_step=0")
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_tensorboard_on_without_the_package_is_a_config_error(
    tiny_config_path, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(tensorboard, "tensorboard_available", lambda: False)
    args = [
        "run",
        str(tiny_config_path),
        "--out",
        str(tmp_path / "r"),
        "--set",
        "train.tensorboard=on",
    ]
    assert main(args) == 2
    assert (
        "train.tensorboard: 'on' needs the tensorboard package (pip install tensorboard"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "r").exists()  # refused before anything was written
    # auto quietly skips it
    assert (
        load_config(str(tiny_config_path), ["train.tensorboard=auto"]).train.tensorboard == "auto"
    )
    with pytest.raises(
        ConfigError, match=r"train.tensorboard: unknown value 'always'.*\['auto', 'on', 'off'\]"
    ):
        load_config(str(tiny_config_path), ["train.tensorboard=always"])


def test_channels_last_trains_to_the_same_numbers(tiny_config_path, tmp_path, monkeypatch):
    plain = _run(tiny_config_path, tmp_path / "plain", "train.tensorboard=off")
    nhwc = _run(
        tiny_config_path, tmp_path / "nhwc", "train.tensorboard=off", "train.channels_last=true"
    )
    for a, b in zip(plain["steps"], nhwc["steps"], strict=True):
        for term, value in a["losses"][0].items():
            assert b["losses"][0][term] == pytest.approx(value, rel=1e-3), term
        assert b["miou_all"] == pytest.approx(a["miou_all"], abs=0.02)
    checkpoint = load_checkpoint(tmp_path / "nhwc" / "step_1.pt")
    assert any(
        t.dim() == 4
        and t.is_contiguous(memory_format=torch.channels_last)
        and not t.is_contiguous()
        for t in checkpoint["model"].values()
    )
    # `incseg eval` evaluates in the training's memory format, so it reproduces the run exactly.
    trained = StepReport.from_confusion(checkpoint["confusion"], restore_step(checkpoint)[1])
    seen = {}

    def recording_evaluate(model, loader, num_classes, rt):
        seen.update(channels_last=rt.channels_last, weight=model.backbone.layers[0][0].weight)
        return evaluate(model, loader, num_classes, rt)

    monkeypatch.setattr(evaluation, "evaluate", recording_evaluate)
    again, _ = evaluate_checkpoint(checkpoint)
    assert seen["channels_last"] and seen["weight"].is_contiguous(memory_format=torch.channels_last)
    assert (
        np.array_equal(again.iou, trained.iou, equal_nan=True)
        and again.pixel_accuracy == trained.pixel_accuracy
    )


@pytest.mark.slow
def test_compiled_model_trains_to_the_same_numbers(tiny_config_path, tmp_path):
    plain = _run(
        tiny_config_path, tmp_path / "plain", "train.tensorboard=off", "protocol.last_step=0"
    )
    compiled = _run(
        tiny_config_path,
        tmp_path / "comp",
        "train.tensorboard=off",
        "protocol.last_step=0",
        "train.compile=true",
    )
    for term, value in plain["steps"][0]["losses"][0].items():
        assert compiled["steps"][0]["losses"][0][term] == pytest.approx(value, rel=1e-3), term


def test_loader_workers_do_not_change_the_results(tiny_config_path, tmp_path):
    # Each image's augmentation has its own seed, so worker processes draw the same crops.
    none = _run(tiny_config_path, tmp_path / "w0", "train.tensorboard=off", "protocol.last_step=0")
    two = _run(
        tiny_config_path,
        tmp_path / "w2",
        "train.tensorboard=off",
        "protocol.last_step=0",
        "data.num_workers=2",
    )
    assert two["steps"] == none["steps"]
