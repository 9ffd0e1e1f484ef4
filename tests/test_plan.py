"""The plan before training: every step's training set is checked before the first step trains,
and ``incseg run --dry-run`` prints the plan of every shipped config without writing anything."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import ADE_ROOT, VOC_ROOT

from incseg.cli import main
from incseg.config import builtin_configs, load_config


def test_a_step_that_cannot_train_stops_the_run_before_step_0_trains(
    tiny_config_path, tmp_path, capsys
):
    out = tmp_path / "run"
    args = [
        "run",
        str(tiny_config_path),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "protocol.setting=19-1",
        "--set",
        "data.num_train=6",
        "--set",
        "train.batch_size=4",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "step 1 of 19-1 (overlap) selects no training images" in err
    assert not out.exists()  # nothing trained, nothing written, the folder left as it was


def test_every_failing_step_is_named(tiny_config_path, tmp_path, capsys):
    args = [
        "run",
        str(tiny_config_path),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "--set",
        "protocol.setting=15-1",
        "--set",
        "data.num_train=10",
        "--set",
        "train.batch_size=4",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "steps cannot train" in err
    failing = [line for line in err.splitlines() if line.strip().startswith("step ")]
    assert len(failing) >= 2, err


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "demo", "--dry-run", "--no-progress", "--set", "data.num_train=200"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("Plan of demo-mib: mib on shapes 15-5 (overlap)")
    step0, step1 = (line.split() for line in lines[2:4])
    config = load_config("demo", ["data.num_train=200"])
    assert step0[0] == "0" and step0[3] == str(config.train.epochs)
    assert step1[0] == "1" and step1[3] == str(config.train.epochs_incremental)
    assert int(step0[4]) == config.train.epochs * (int(step0[1]) // config.train.batch_size)
    assert "checks: every step can train" in out
    assert list(tmp_path.iterdir()) == []


def _data_root(name: str) -> list[str]:
    config_family = load_config(name).data.dataset
    root = {"voc": VOC_ROOT, "ade": ADE_ROOT}.get(config_family)
    return [] if root is None else ["--set", f"data.root={root}"]


@pytest.mark.parametrize("name", builtin_configs(with_folders=True))
def test_dry_run_of_every_shipped_config(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["run", name, "--dry-run", "--no-progress", *_data_root(name)])
    out, err = capsys.readouterr()
    assert f"Plan of {load_config(name).name}:" in out, err
    assert "Traceback" not in err
    # On the small fixtures most incremental steps select too few images, and the VOC fixture has
    # no saliency maps: then the plan's checks line says why, and the error is the run's.
    checks = next(line for line in out.splitlines() if line.startswith("checks: "))
    if code != 0:
        assert "cannot train" in checks or "the run stops before training" in checks
        assert err.startswith("error: "), err
    assert list(tmp_path.iterdir()) == []


def test_dry_run_counts_the_old_model_of_a_method_with_add_ons(capsys):
    assert main(["run", "demo", "--dry-run", "--no-progress", "--set", "method.name=mib+ewf"]) == 0
    assert main(["run", "demo", "--dry-run", "--no-progress"]) == 0
    with_addon, plain = (
        next(line for line in text.splitlines() if line.startswith("image passes"))
        for text in capsys.readouterr().out.split("Plan of ")[1:]
    )
    assert with_addon == plain and " 0 old-model" not in plain


def _refusals(args: list[str], out: str, capsys) -> tuple[str, str, str]:
    """What ``incseg run ARGS --dry-run`` prints (the plan, the error) and the error of the run
    of the same command line, both of which must exit 2 without a traceback."""
    assert main(["run", *args, "--dry-run", "--no-progress"]) == 2
    plan, dry_err = capsys.readouterr()
    assert main(["run", *args, "--no-progress", "--out", out]) == 2
    run_err = capsys.readouterr().err
    assert "Traceback" not in dry_err + run_err
    return plan, dry_err[dry_err.index("error: ") :], run_err[run_err.index("error: ") :]


def test_dry_run_refuses_a_memory_larger_than_step_0(tiny_config_path, tmp_path, capsys):
    sets = ["method.name=dkd", "model.architecture=dkd", "method.memory_size=500"]
    args = [str(tiny_config_path), *(a for s in sets for a in ("--set", s))]
    plan, dry, run = _refusals(args, str(tmp_path / "run"), capsys)
    assert dry == run
    first = int(plan.splitlines()[2].split()[1])  # step 0's training images in the table
    assert f"method.memory_size 500: more than the {first} training images of step 0" in run
    assert f"checks: the run stops before training: {run.removeprefix('error: ')}" in plan
    assert not (tmp_path / "run").exists()


def test_dry_run_refuses_cuda_without_a_cuda_device(
    tiny_config_path, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [str(tiny_config_path), "--set", "train.device=cuda"]
    plan, dry, run = _refusals(args, str(tmp_path / "run"), capsys)
    assert dry == run and "train.device: cuda, but PyTorch finds no CUDA device" in run
    assert plan == ""  # refused before any data is read, as the run refuses it
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("saliency", [None, "empty"])
def test_dry_run_refuses_missing_saliency_maps(voc_config_path, saliency, tmp_path, capsys):
    sets = ["method.name=ssul", "model.architecture=ssul"]
    if saliency is not None:
        (tmp_path / saliency).mkdir()
        sets.append(f"data.saliency={tmp_path / saliency}")
    args = [str(voc_config_path), *(a for s in sets for a in ("--set", s))]
    plan, dry, run = _refusals(args, str(tmp_path / "run"), capsys)
    assert dry == run
    assert ("is not set" if saliency is None else "saliency map(s) missing") in run
    assert "checks: the run stops before training: " in plan
    assert "every step can train" not in plan


def test_dry_run_counts_the_training_images_the_refusal_names(tmp_path, capsys):
    args = ["voc/15-1-overlap-star-m", "--set", f"data.root={VOC_ROOT}"]
    plan, dry, run = _refusals(args, str(tmp_path / "run"), capsys)
    assert dry == run
    rows = {
        int(line.split()[0]): line.split()
        for line in plan.splitlines()[2:]
        if line[:4].strip().isdigit()
    }
    named = re.findall(r"step (\d+): (\d+) training image\(s\)", run)
    assert named  # the fixture's steps 1-3 hold one training image each
    for step, count in named:
        assert rows[int(step)][1] == count, (step, plan)
    assert "checks: steps [1, 2, 3, 4] cannot train" in plan
