"""``incseg compare``: every method on one setting, table files, finished methods not re-run."""

import csv
import json

from incseg.cli import main
from incseg.compare import comparison_row


def test_compare_writes_table_and_reuses_finished_runs(tiny_config_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", str(tiny_config_path), "--methods", "ft,mib", "--joint", "--out", str(out),
            "--no-progress", "--set", "protocol.setting=19-1"]  # fmt: skip
    assert main(args) == 0
    for name in ("comparison.md", "comparison.csv", "comparison.png"):
        assert (out / name).is_file()
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["method"] for r in rows] == ["ft", "mib", "joint"]
    assert "old_0-19" in rows[0] and "new_20-20" in rows[0]
    assert "| mib |" in (out / "comparison.md").read_text()
    joint = json.loads((out / "joint" / "metrics.json").read_text())
    assert joint["setting"] == "offline" and len(joint["steps"]) == 1
    mtime = (out / "mib" / "step_1.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "mib: finished run found" in capsys.readouterr().out
    assert (out / "mib" / "step_1.pt").stat().st_mtime_ns == mtime


def test_compare_rejects_unknown_methods(tiny_config_path, tmp_path, capsys):
    assert main(["compare", str(tiny_config_path), "--methods", "ft,icarl", "--out", str(tmp_path)]) == 2
    assert "unknown method 'icarl'" in capsys.readouterr().err


def test_comparison_row_splits_joint_by_class_name():
    metrics = {"steps": [{"miou_all": 0.5, "per_class": {"background": 0.9, "cat": 0.5, "dog": 0.1, "cow": None}}]}
    row = comparison_row("joint", metrics, old_names={"background", "cat"})
    assert row["old"] == 0.7 and abs(row["new"] - 0.1) < 1e-12 and row["avg"] == 0.5
