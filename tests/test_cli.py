"""End to end through ``cli.main``: a two-step run, its files, reload, determinism, user errors."""

import json
import math
import subprocess
import sys

import pytest
import torch

from incseg.cli import main
from incseg.engine.checkpoint import load_checkpoint
from incseg.engine.evaluate import evaluate_checkpoint


@pytest.fixture(scope="module")
def run_dir(tiny_config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mib"
    assert main(["run", str(tiny_config_path), "--out", str(out), "--no-progress"]) == 0
    return out


def test_two_step_run_writes_everything(run_dir, tiny_config_path, capsys):
    for name in ("config.yaml", "step_0.pt", "step_1.pt", "metrics.json", "summary.md"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [s["step"] for s in metrics["steps"]] == [0, 1]
    assert list(metrics["steps"][1]["per_class"])[-1] == "tvmonitor"
    assert len(metrics["steps"][0]["per_class"]) == 16
    assert set(metrics["steps"][1]["losses"][0]) == {"unce", "unkd"}  # per epoch
    assert "| avg |" in (run_dir / "summary.md").read_text()


def test_run_prints_tables_with_class_names(tiny_config_path, tmp_path, capsys):
    out = tmp_path / "printed"
    assert (
        main(
            [
                "run",
                str(tiny_config_path),
                "--out",
                str(out),
                "--no-progress",
                "--set",
                "protocol.last_step=0",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert (
        "person" in text and "old (1-15)" in text and "w/ bg (0-15)" in text and "Summary" in text
    )
    assert not (out / "step_1.pt").exists()


def test_reloaded_checkpoint_reproduces_evaluation_exactly(run_dir, capsys):
    metrics = json.loads((run_dir / "metrics.json").read_text())["steps"][1]
    report, _ = evaluate_checkpoint(load_checkpoint(run_dir / "step_1.pt"))
    assert report.to_dict()["per_class"] == metrics["per_class"]
    assert report.miou_all == metrics["miou_all"]
    assert main(["eval", str(run_dir), "--no-progress"]) == 0
    assert f"all (1-20) {100 * metrics['miou_all']:5.1f}" in capsys.readouterr().out


def test_same_seed_gives_same_losses(run_dir, tiny_config_path, tmp_path):
    again = tmp_path / "again"
    assert main(["run", str(tiny_config_path), "--out", str(again), "--no-progress"]) == 0
    first = json.loads((run_dir / "metrics.json").read_text())
    second = json.loads((again / "metrics.json").read_text())
    assert [s["losses"] for s in first["steps"]] == [s["losses"] for s in second["steps"]]
    a, b = load_checkpoint(run_dir / "step_1.pt"), load_checkpoint(again / "step_1.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_bad_config_exits_2_with_message(tiny_config_path, tmp_path, capsys):
    code = main(
        ["run", str(tiny_config_path), "--out", str(tmp_path / "x"), "--set", "train.epochs=-3"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "train.epochs: must be in [1, 10,000], got -3" in err and str(tiny_config_path) in err
    assert not (tmp_path / "x").exists()  # rejected before any work


def test_bad_config_in_a_real_process_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("protocol: {setting: 15-6}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "incseg", "run", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "protocol.setting: unknown voc setting '15-6'; valid settings:" in proc.stderr


def test_existing_run_is_not_overwritten(run_dir, tiny_config_path, capsys):
    before = (run_dir / "metrics.json").read_text()
    assert main(["run", str(tiny_config_path), "--out", str(run_dir)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run_dir / "metrics.json").read_text() == before


def test_eval_rejects_non_checkpoints(tmp_path, capsys):
    fake = tmp_path / "step_0.pt"
    fake.write_text("not a checkpoint")
    assert main(["eval", str(fake)]) == 2
    assert str(fake) in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.pt")]) == 2


def test_bf16_autocast_runs_a_step_on_cpu(tiny_config_path, tmp_path):
    out = tmp_path / "bf16"
    args = [
        "run",
        str(tiny_config_path),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "train.amp=bf16",
        "--set",
        "protocol.last_step=0",
    ]
    assert main(args) == 0
    losses = json.loads((out / "metrics.json").read_text())["steps"][0]["losses"][0]
    assert losses and all(math.isfinite(value) for value in losses.values())


def test_validation_during_training_is_recorded_and_changes_nothing(tiny_config_path, tmp_path):
    import json

    runs = {}
    for name, extra in (("plain", []), ("val", ["--set", "train.val_interval=1"])):
        out = tmp_path / name
        assert main(["run", str(tiny_config_path), "--out", str(out), "--no-progress", *extra]) == 0
        runs[name] = json.loads((out / "metrics.json").read_text())
    for step in runs["val"]["steps"]:
        assert all(0.0 <= epoch["val_miou"] <= 1.0 for epoch in step["losses"])
    assert "val_miou" not in runs["plain"]["steps"][0]["losses"][0]
    assert [s["miou_all"] for s in runs["val"]["steps"]] == [
        s["miou_all"] for s in runs["plain"]["steps"]
    ]


def test_validation_needs_the_mib_convention(tmp_path, capsys):
    args = [
        "run",
        "--set",
        "train.val_interval=1",
        "--set",
        "protocol.labels=plop",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main(args) == 2
    assert (
        "train.val_interval: validation during training follows MiB's convention"
        in capsys.readouterr().err
    )


def test_methods_lists_every_method_and_shows_hyperparameters(capsys):
    assert main(["methods"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any(r.split() == ["plop", "nothing", "incseg.methods.plop:PLOP"] for r in rows)
    assert any(r.startswith("ssul") and "images if memory_size > 0" in r for r in rows)
    methods = rows[1 : rows.index("")]  # after the header
    assert len(methods) == 22 and all(":" in r for r in methods)
    assert any(r.split()[:4] == ["simcis", "query", "features", "(80"] for r in rows)
    assert [r.split()[0] for r in methods] == sorted(r.split()[0] for r in methods)
    assert any(r.split() == ["ewf", "incseg.methods.ewf:EWF"] for r in rows)  # the add-ons
    assert main(["methods", "plop"]) == 0
    shown = capsys.readouterr().out
    assert (
        "pod_logits_factor: float = 0.0005  in [0, 1,000,000]" in shown
        and "median: str = 'published'" in shown
    )
    assert main(["methods", "plop+ewf"]) == 0
    shown = capsys.readouterr().out
    assert (
        "hyperparameters (method.ewf.KEY" in shown
        and "freeze_old_classifiers: bool = True" in shown
    )
    assert main(["methods", "icarl"]) == 2
    assert "method.name: unknown value 'icarl'" in capsys.readouterr().err


def test_methods_says_what_rcil_needs_and_lists_the_add_ons_keys(capsys):
    assert main(["methods", "rcil"]) == 0
    assert "needs model.architecture: rcil" in capsys.readouterr().out
    assert main(["methods", "mib+nest+ucd"]) == 0
    shown = capsys.readouterr().out
    assert "method.nest.KEY" in shown and "method.ucd.KEY" in shown and "lr_scale" in shown
