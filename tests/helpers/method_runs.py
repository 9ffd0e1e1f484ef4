"""End-to-end runs of a method through ``cli.main`` and the check that an interrupted step
resumes to the same numbers and weights (shared by the tests of each method and add-on)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from incseg.cli import main
from incseg.engine.checkpoint import load_checkpoint


def run_method(config: Path, out: Path, *sets: str) -> list[str]:
    """Run ``config`` into ``out`` with two epochs per incremental step and ``--set`` each of
    ``sets``; returns the CLI arguments (for :func:`check_exact_resume`)."""
    args = ["run", str(config), "--out", str(out), "--no-progress"]
    for value in ("train.epochs_incremental=2", "train.tensorboard=off", *sets):
        args += ["--set", value]
    assert main(args) == 0
    return args


def check_exact_resume(
    out: Path, args: list[str], tmp: Path, kill_at: str = "iteration:1:1:2"
) -> None:
    """Run ``args`` again into ``tmp / "run"``, killed (SIGKILL) at ``kill_at`` (by default in
    step 1's second epoch), resume it, and assert every per-class IoU and epoch loss equals the
    uninterrupted run ``out``'s, and the last step's weights to the last bit."""
    run = tmp / "run"
    cmd = [sys.executable, "-m", "incseg", *args]
    cmd[cmd.index(str(out))] = str(run)
    env = {**os.environ, "INCSEG_KILL_AT": kill_at}
    proc = subprocess.run(cmd, capture_output=True, env=env, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    numbers = [json.loads((d / "metrics.json").read_text())["steps"] for d in (out, run)]
    assert [(s["per_class"], s["losses"]) for s in numbers[0]] == [
        (s["per_class"], s["losses"]) for s in numbers[1]
    ]
    last = f"step_{len(numbers[0]) - 1}.pt"  # and the weights to the last bit
    weights = [load_checkpoint(d / last)["model"] for d in (out, run)]
    assert [k for k, v in weights[0].items() if not torch.equal(v, weights[1][k])] == []


def step_training_images(out: Path, step: int) -> int:
    """How many training images (memory excluded) step ``step`` of the run in ``out`` selects."""
    import yaml

    from incseg.config import config_from_dict
    from incseg.engine.loaders import Sources
    from incseg.protocol import get_setting, step_info

    config = config_from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    info = step_info(get_setting(config.family, config.protocol.setting), step)
    return len(Sources.load(config).train_indices(info))
