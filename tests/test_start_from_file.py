"""``incseg run --start-from FILE.pt``: a run seeded with step-0 weights from a checkpoint file
(what ``incseg import-checkpoint`` writes, or a run's ``step_0.pt``) evaluates step 0 on them and
trains the later steps exactly as the run that made them; the files it cannot start from are
named before anything is written (engine/adopt.py ``adopt_weights``)."""

from __future__ import annotations

import json

import pytest

from incseg.cli import main
from incseg.config import load_config
from incseg.engine.adopt import adopt_weights
from incseg.engine.checkpoint import load_checkpoint, save_checkpoint

FAST = ["--no-progress", "--set", "data.num_train=40", "--set", "data.num_test=12"]
TWO_STEPS = [*FAST, "--set", "protocol.last_step=1"]
NUMBERS = ("miou_old", "miou_new", "miou_all", "miou_with_bg", "pixel_accuracy", "per_class")


@pytest.fixture(scope="module")
def source_run(tiny_config_path, tmp_path_factory):
    """MiB's two steps of 15-5 on the tiny config, trained here."""
    out = tmp_path_factory.mktemp("source") / "run"
    assert main(["run", str(tiny_config_path), "--out", str(out), *TWO_STEPS]) == 0
    return out


def _steps(run):
    return json.loads((run / "metrics.json").read_text())["steps"]


def test_a_run_seeded_with_a_step_0_file_evaluates_it_and_trains_step_1_as_its_source(
    source_run, tiny_config_path, tmp_path
):
    out, weights = tmp_path / "seeded", source_run / "step_0.pt"
    args = ["run", str(tiny_config_path), "--out", str(out), "--start-from", str(weights)]
    assert main([*args, *TWO_STEPS]) == 0
    ours, theirs = _steps(out), _steps(source_run)
    assert ours[0]["started_from"] == str(weights) and ours[0]["losses"] == []
    assert "started_from" not in ours[1]
    for step in (0, 1):  # step 0: the same weights evaluated; step 1: trained identically
        assert {k: ours[step][k] for k in NUMBERS} == {k: theirs[step][k] for k in NUMBERS}
    trained, again = (load_checkpoint(r / "step_1.pt")["model"] for r in (source_run, out))
    assert all(bool((again[k] == v).all()) for k, v in trained.items())  # to the last bit
    seed = load_checkpoint(out / "seed_step_0.pt")
    assert seed["seeded_from"] == str(weights)
    source = load_checkpoint(weights)
    assert all((seed["model"][k] == v).all() for k, v in source["model"].items())


def _as_imported(step_file, path):
    """The step as ``incseg import-checkpoint`` writes one (cli.py ``_import_checkpoint``): no
    confusion matrix, metrics or memory, no method state."""
    full = load_checkpoint(step_file)
    keep = ("step", "setting", "channels_per_step", "config", "model")
    save_checkpoint(path, {k: full[k] for k in keep} | {"method": {}, "imported_from": "x.pth"})
    return path


def test_a_seeded_run_killed_before_its_step_0_resumes_from_its_seed(
    source_run, tiny_config_path, tmp_path
):
    out = tmp_path / "seeded"
    weights = _as_imported(source_run / "step_0.pt", tmp_path / "imported.pt")
    config = load_config(str(tiny_config_path), ["data.num_train=40", "data.num_test=12"])
    adopt_weights(out, config, weights)  # what the run writes before a kill
    args = ["run", str(tiny_config_path), "--out", str(out), "--resume", *FAST]
    assert main([*args, "--set", "protocol.last_step=0"]) == 0
    step = _steps(out)[0]
    assert step["started_from"] == str(weights)
    assert step["miou_all"] == _steps(source_run)[0]["miou_all"]
    adopt_weights(out, config, weights)  # the same weights again: a resume, left as it is
    assert (out / "step_0.pt").is_file()


def _refused(capsys, args):
    assert main(args) == 2
    return capsys.readouterr().err


def test_files_a_run_cannot_start_from_are_named_before_anything_is_written(
    source_run, tiny_config_path, tmp_path, capsys
):
    out = tmp_path / "new"
    run = ["run", str(tiny_config_path), "--out", str(out), *TWO_STEPS, "--start-from"]
    step_1 = source_run / "step_1.pt"
    err = _refused(capsys, [*run, str(step_1)])
    assert f"--start-from {step_1}: holds step 1; a checkpoint file starts a run at step 0" in err
    step_0 = str(source_run / "step_0.pt")
    err = _refused(capsys, [*run, step_0, "--start-step", "1"])
    assert "is a checkpoint file, which seeds step 0 only" in err
    err = _refused(capsys, [*run, step_0, "--set", "train.lr=0.5"])
    assert (
        f"--start-from {step_0}: its step 0 was made with another config (train.lr: 0.02 -> 0.5)"
        in err
    )
    err = _refused(capsys, [*run, step_0, "--set", "method.name=ewc"])
    assert "ewc keeps what the training iterations of step 0 gather" in err
    foreign = tmp_path / "official.pth"
    foreign.write_bytes(step_1.read_bytes()[:100])
    err = _refused(capsys, [*run, str(foreign)])
    assert str(foreign) in err and "`incseg import-checkpoint`" in err
    err = _refused(capsys, [*run, str(tmp_path / "typo.pt")])
    assert f"--start-from {tmp_path / 'typo.pt'}: no such run directory or checkpoint file" in err
    assert not out.exists()


def test_a_directory_started_otherwise_is_not_mixed_with_other_weights(
    source_run, tiny_config_path, tmp_path, capsys
):
    other = load_checkpoint(source_run / "step_0.pt")
    other["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in other["model"].items()}
    save_checkpoint(tmp_path / "other.pt", other)
    config = load_config(str(tiny_config_path), ["data.num_train=40", "data.num_test=12"])
    out = tmp_path / "seeded"
    adopt_weights(out, config, source_run / "step_0.pt")
    args = ["run", str(tiny_config_path), "--out", str(out), "--resume", *TWO_STEPS]
    err = _refused(capsys, [*args, "--start-from", str(tmp_path / "other.pt")])
    assert f"{out} was started from {source_run / 'step_0.pt'}, not from these weights" in err
    args = ["run", str(tiny_config_path), "--out", str(source_run), "--resume", *TWO_STEPS]
    err = _refused(capsys, [*args, "--start-from", str(tmp_path / "other.pt")])
    assert "was started from its own step 0" in err
    args = ["run", str(tiny_config_path), "--out", str(source_run), "--overwrite", *TWO_STEPS]
    err = _refused(capsys, [*args, "--start-from", str(source_run / "step_0.pt")])
    assert "step_0.pt is in the --out directory; start from another run or a file" in err
    assert (source_run / "step_0.pt").is_file()  # --overwrite removed nothing
