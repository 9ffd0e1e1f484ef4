"""Interrupted runs resume from the last finished step and give the numbers of an uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from incseg.cli import main


def _numbers(run_dir):
    steps = json.loads((run_dir / "metrics.json").read_text())["steps"]
    return [(s["miou_all"], s["per_class"], s["losses"]) for s in steps]


def _command(config_path, run_dir):
    """``incseg run`` in a subprocess of its own (so that it can be killed)."""
    return [
        sys.executable,
        "-m",
        "incseg",
        "run",
        str(config_path),
        "--out",
        str(run_dir),
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def reference(tiny_config_path, tmp_path_factory):
    """An uninterrupted two-step run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["run", str(tiny_config_path), "--out", str(out), "--no-progress"]) == 0
    return out


def test_resume_after_losing_the_last_step_is_exact(reference, tiny_config_path, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "step_1.pt").unlink()  # as if killed during step 1
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["steps"] = metrics["steps"][:1]
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["run", str(tiny_config_path), "--out", str(run), "--no-progress"]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert "steps 0..0 finished and restored" in capsys.readouterr().out
    assert _numbers(run) == _numbers(reference)
    assert (run / "summary.md").read_text() == (reference / "summary.md").read_text()


def test_resume_of_a_finished_run_trains_nothing(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    mtimes = {p.name: p.stat().st_mtime_ns for p in run.glob("step_*.pt")}
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert "steps 0..1 finished and restored" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("step_*.pt")} == mtimes
    assert _numbers(run) == _numbers(reference)


def test_resume_with_another_config_is_refused(reference, tiny_config_path, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    args = ["run", str(tiny_config_path), "--out", str(run), "--resume", "--set", "train.lr=0.5"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "train.lr: 0.02 -> 0.5" in err
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml there" in capsys.readouterr().err
    assert main(["run", str(tiny_config_path), "--out", str(run), "--resume", "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_sigkill_during_step_1_then_resume_is_exact(reference, tiny_config_path, tmp_path):
    run = tmp_path / "run"
    cmd = _command(tiny_config_path, run)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy()
    )
    deadline = time.monotonic() + 300
    while not (run / "step_0.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "step_1.pt").exists(), "the run finished before it could be killed"
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert _numbers(run) == _numbers(reference)


EPOCHS2 = [
    "--set",
    "train.epochs=2",
    "--set",
    "train.epochs_incremental=2",
    "--set",
    "data.num_train=48",
    "--set",
    "data.num_test=12",
]


@pytest.fixture(scope="module")
def reference2(tiny_config_path, tmp_path_factory):
    """An uninterrupted two-step run with two epochs per step."""
    out = tmp_path_factory.mktemp("ref2") / "run"
    assert main(["run", str(tiny_config_path), "--out", str(out), "--no-progress", *EPOCHS2]) == 0
    return out


@pytest.mark.parametrize(
    "point",
    [
        "iteration:0:1:3",  # mid-epoch (step 0, second epoch)
        "epoch:0:1",  # between epochs, just after the epoch checkpoint
        "step:0",  # between steps
        "write:last.pt",  # during the first epoch-checkpoint write
        "iteration:1:0:2",  # mid-epoch in step 1 (old model and MiB losses in play)
        "write:step_1.pt",  # during the last step checkpoint write
        "write:metrics.json",  # during a metrics write
    ],
)
def test_sigkill_at_a_point_then_resume_is_exact(point, reference2, tiny_config_path, tmp_path):
    run = tmp_path / "run"
    cmd = [*_command(tiny_config_path, run), *EPOCHS2]
    proc = subprocess.run(
        cmd, capture_output=True, env={**os.environ, "INCSEG_KILL_AT": point}, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (
        main(
            ["run", str(tiny_config_path), "--out", str(run), "--resume", "--no-progress", *EPOCHS2]
        )
        == 0
    )
    assert _numbers(run) == _numbers(reference2)
    assert not list(run.glob(".*.tmp")) and not (run / "last.pt").exists()


def test_a_run_saved_before_new_config_keys_existed_is_still_the_same_config(
    reference, tmp_path, capsys
):
    import yaml

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del (
        saved["train"]["checkpoint_every"],
        saved["protocol"]["split_source"],
    )  # keys of a newer incseg, at defaults
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert "steps 0..1 finished and restored" in capsys.readouterr().out
