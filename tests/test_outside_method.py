"""The worked example of docs/methods.md ("Writing a method"), taken from the document itself, runs
through ``incseg run`` as ``module:Class`` and as an entry point, validated like a built-in."""

from __future__ import annotations

import json
import math
import re
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from incseg import methods
from incseg.cli import main

DOC = Path(__file__).parents[1] / "docs" / "methods.md"
SETS = ["--set", "train.epochs=1", "--set", "train.epochs_incremental=2", "--no-progress"]


@pytest.fixture
def my_methods(tmp_path, monkeypatch):
    text = DOC.read_text().split("## Writing a method", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    assert len(code.splitlines()) < 60 and "class ConfidentPseudo(Method)" in code
    (tmp_path / "my_methods.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _losses(run_dir):
    return [s["losses"] for s in json.loads((run_dir / "metrics.json").read_text())["steps"]]


def test_the_documented_method_runs_from_its_module_path(
    my_methods, tiny_config_path, tmp_path, capsys
):
    name = "method.name=my_methods:ConfidentPseudo"
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                str(tiny_config_path),
                "--out",
                str(out),
                "--set",
                name,
                "--set",
                "method.floor=0.2",
                *SETS,
            ]
        )
        == 0
    )
    losses = _losses(out)
    assert [sorted(e) for e in losses[1]] == [["ce", "kd"], ["ce", "kd"]]
    capsys.readouterr()
    assert main(["methods", "my_methods:ConfidentPseudo"]) == 0
    shown = capsys.readouterr().out
    assert (
        "kd_weight: float = 10.0  in [0, 1,000,000]" in shown
        and "floor: float = 0.5  in [0, 1]" in shown
    )
    assert "scans_old_model=True" in shown


def test_the_documented_methods_hooks_on_a_hand_made_batch(my_methods):
    import torch
    from my_methods import ConfidentPseudo

    from incseg.models.segmenter import SegmenterOutput
    from incseg.protocol import get_setting, step_info

    info = step_info(get_setting("voc", "15-5"), 1)  # 16 old channels
    logits = torch.zeros(1, 16, 1, 3)
    logits[0, 3, 0, 0] = 5.0  # pixel 0: class 3 with p = e^5 / (e^5 + 15) = 0.908
    targets = torch.tensor([[[0, 0, 17]]])  # pixel 1: uniform; pixel 2: a new class
    method = ConfidentPseudo(floor=0.3)
    out = SegmenterOutput(logits, {})
    method.end_scan(method.scan(out, targets, info), info)
    p = math.exp(5) / (math.exp(5) + 15)
    assert method.confidence[3].item() == pytest.approx(p) and method.confidence[
        0
    ].item() == pytest.approx(0.3)
    assert method.relabel(out, targets, info).tolist() == [[[3, 0, 17]]]
    method.floor = 0.95  # above pixel 0's confidence: nothing is relabelled
    method.end_scan(method.scan(out, targets, info), info)
    assert method.relabel(out, targets, info).tolist() == [[[0, 0, 17]]]


def test_the_documented_method_is_validated_like_a_builtin(
    my_methods, tiny_config_path, tmp_path, capsys
):
    base = [
        "run",
        str(tiny_config_path),
        "--out",
        str(tmp_path / "o"),
        "--set",
        "method.name=my_methods:ConfidentPseudo",
    ]
    assert main([*base, "--set", "method.floor=2"]) == 2
    assert "method.floor: must be in [0, 1], got 2" in capsys.readouterr().err
    assert main([*base, "--set", "method.temperature=2"]) == 2
    assert (
        "unknown key(s) ['temperature']; valid keys: ['kd_weight', 'floor']"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()


def test_an_entry_point_names_an_outside_method(
    my_methods, tiny_config_path, tmp_path, monkeypatch
):
    point = EntryPoint("confident", "my_methods:ConfidentPseudo", methods.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        methods, "entry_points", lambda group: [point] if group == methods.ENTRY_POINT_GROUP else []
    )
    assert methods.method_class("confident").__name__ == "ConfidentPseudo"
    out = tmp_path / "run"
    sets = ["--set", "method.name=confident", "--set", "protocol.last_step=0"]
    assert main(["run", str(tiny_config_path), "--out", str(out), *sets, *SETS]) == 0
