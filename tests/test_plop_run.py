"""PLOP end to end (``run_protocol`` with a counting PLOP, and ``cli.main``): the scan runs once per
step > 0, and an interrupted step resumes with its saved thresholds to the numbers of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from incseg.cli import main
from incseg.config import load_config
from incseg.engine.run import run_protocol
from incseg.methods.plop import PLOP


class CountingPLOP(PLOP):
    """PLOP that records the steps it scans (or refuses to scan)."""

    scanned: list[int]
    refuse: bool = False

    def end_scan(self, totals, info):
        assert not self.refuse, "a resumed step must take its thresholds from last.pt"
        self.scanned.append(info.step)
        super().end_scan(totals, info)


def _counting(refuse=False):
    method = CountingPLOP()
    method.scanned, method.refuse = [], refuse
    return method


# Output stride 8: the tiny backbone's maps are 8, 4, 4, 4 wide at crop 32, enough for POD's 4x4 grid.
PLOP_CONFIG = """\
name: plop-test
data: {dataset: shapes, image_size: 32, num_train: 80, num_test: 24, crop_size: 32}
protocol: {setting: 15-5, mode: overlap, labels: plop}
model: {backbone: tiny, output_stride: 8, norm: bn, head_channels: 8}
method: {name: plop}
train: {epochs: 2, epochs_incremental: 2, lr: 0.02, lr_incremental: 0.01, batch_size: 8,
        eval_batch_size: 12, log_interval: 2, tensorboard: "off"}
"""


@pytest.fixture(scope="module")
def plop_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("plop") / "plop.yaml"
    path.write_text(PLOP_CONFIG)
    return path


@pytest.fixture(scope="module")
def plop_reference(plop_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("plop-ref") / "run"
    method = _counting()
    run_protocol(load_config(str(plop_config)), out, method=method, progress=False)
    assert method.scanned == [1]  # once, for step 1 only
    return out


def _numbers(run_dir):
    steps = json.loads((run_dir / "metrics.json").read_text())["steps"]
    return [(s["miou_all"], s["per_class"], s["losses"]) for s in steps]


def test_plop_run_trains_pod_and_pseudo_labels(plop_reference):
    steps = json.loads((plop_reference / "metrics.json").read_text())["steps"]
    assert [sorted(epoch) for epoch in steps[0]["losses"]] == [["ce"], ["ce"]]
    assert [sorted(epoch) for epoch in steps[1]["losses"]] == [["ce", "pod"], ["ce", "pod"]]
    assert all(epoch["pod"] > 0 for epoch in steps[1]["losses"])
    saved = torch.load(plop_reference / "step_1.pt", weights_only=False)
    assert saved["config"]["method"]["name"] == "plop"


def test_interrupted_plop_step_resumes_with_its_thresholds(plop_reference, plop_config, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "incseg",
        "run",
        str(plop_config),
        "--out",
        str(run),
        "--no-progress",
    ]
    env = {**os.environ, "INCSEG_KILL_AT": "iteration:1:1:2"}  # step 1, second epoch
    proc = subprocess.run(cmd, capture_output=True, env=env, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    last = torch.load(run / "last.pt", weights_only=False)
    assert last["method_step"]["thresholds"].shape == (21,)

    method = _counting(refuse=True)
    run_protocol(load_config(str(plop_config)), run, method=method, progress=False, resume=True)
    assert _numbers(run) == _numbers(plop_reference)


def test_plop_on_maps_too_small_for_pod_stops_with_a_config_error(plop_config, tmp_path, capsys):
    args = [
        "run",
        str(plop_config),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
        "--set",
        "model.output_stride=16",
    ]
    assert main(args) == 2
    assert "local POD needs maps at least 4 wide" in capsys.readouterr().err
