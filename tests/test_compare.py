"""``incseg compare``: every method on one setting, table files, finished methods not re-run."""

import contextlib
import csv
import fcntl
import json
import os
import re
import subprocess
import sys

import pytest

from incseg.cli import main
from incseg.compare_table import comparison_row


def test_compare_writes_table_and_reuses_finished_runs(tiny_config_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = [
        "compare",
        str(tiny_config_path),
        "--methods",
        "ft,mib",
        "--joint",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "protocol.setting=19-1",
    ]
    assert main(args) == 0
    for name in ("comparison.md", "comparison.csv", "comparison.png"):
        assert (out / name).is_file()
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["method"] for r in rows] == ["ft", "mib", "joint"]
    assert {"old_1-19", "new_20-20", "all_1-20", "with_bg_0-20"} <= rows[0].keys()
    assert "| mib | nothing |" in (out / "comparison.md").read_text()
    assert {r["stores"] for r in rows} == {"nothing"}
    joint = json.loads((out / "joint" / "metrics.json").read_text())
    assert joint["setting"] == "offline" and len(joint["steps"]) == 1
    mtime = (out / "mib" / "step_1.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "mib: finished run found" in capsys.readouterr().out
    assert (out / "mib" / "step_1.pt").stat().st_mtime_ns == mtime


def test_compare_rejects_unknown_methods(tiny_config_path, tmp_path, capsys):
    assert (
        main(["compare", str(tiny_config_path), "--methods", "ft,icarl", "--out", str(tmp_path)])
        == 2
    )
    assert "--methods: method.name: unknown value 'icarl'" in capsys.readouterr().err


def test_comparison_row_splits_joint_by_class_name():
    metrics = {"steps": [{"per_class": {"background": 0.9, "cat": 0.5, "dog": 0.1, "cow": None}}]}
    row = comparison_row("joint", metrics, old_names={"background", "cat"}, background="background")
    assert row["old"] == 0.5 and abs(row["new"] - 0.1) < 1e-12  # background in no paper group
    assert (
        row["all"] == pytest.approx(0.3)
        and row["with_bg"] == pytest.approx(0.5)
        and row["avg"] == row["all"]
    )


def test_failed_method_is_recorded_and_the_others_still_run(tiny_config_path, tmp_path):
    from incseg.compare import ComparisonOptions, run_comparison
    from incseg.config import load_config
    from incseg.engine.run import run_protocol
    from incseg.engine.train import NonFiniteLossError

    base = load_config(tiny_config_path, ["protocol.setting=19-1"])
    ran = []

    def run(config, run_dir):
        ran.append(config.method.name)
        if config.method.name == "ewc":
            raise NonFiniteLossError("non-finite loss at step 1, epoch 1, iteration 2: loss=nan")
        run_protocol(config, run_dir, progress=False)

    out = tmp_path / "cmp"
    options = ComparisonOptions(("ewc", "ft"), method_sets={"ewc": ["weight=5"]})
    rows = run_comparison(base, options, out, run=run)
    assert ran == ["ewc", "ft"]
    assert (
        rows[0]["failed"].startswith("non-finite loss at step 1") and rows[1].get("failed") is None
    )
    text = (out / "comparison.md").read_text()
    assert (
        "| ewc | nothing | - | - | - | - | - |" in text
        and "- ewc: non-finite loss at step 1" in text
    )
    csv_rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert csv_rows[0]["all_1-20"] == "" and float(csv_rows[1]["with_bg_0-20"]) > 0
    assert (out / "comparison.png").is_file()


def test_method_set_reaches_only_that_method(tiny_config_path, tmp_path):
    import yaml

    out = tmp_path / "cmp"
    args = [
        "compare",
        str(tiny_config_path),
        "--methods",
        "ewc,ft",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "protocol.setting=19-1",
        "--method-set",
        "ewc.weight=7.5",
        "--method-set",
        "ewc.alpha=0.5",
    ]
    assert main(args) == 0
    saved = yaml.safe_load((out / "ewc" / "config.yaml").read_text())["method"]
    assert saved["weight"] == 7.5 and saved["alpha"] == 0.5
    assert yaml.safe_load((out / "ft" / "config.yaml").read_text())["method"] == {"name": "ft"}


def test_method_set_errors_name_the_problem(tiny_config_path, tmp_path, capsys):
    base = ["compare", str(tiny_config_path), "--methods", "ewc,ft", "--out", str(tmp_path / "c")]
    assert main([*base, "--method-set", "mib.kd_weight=5"]) == 2
    assert "'mib' is not in --methods" in capsys.readouterr().err
    assert main([*base, "--method-set", "ewc.wieght=5"]) == 2
    err = capsys.readouterr().err
    assert "--method-set for ewc" in err and "wieght" in err
    assert main([*base, "--method-set", "ewc"]) == 2
    assert "expected METHOD.KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_compare_refuses_a_run_made_with_another_config(tiny_config_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = [
        "compare",
        str(tiny_config_path),
        "--methods",
        "ewc",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "protocol.setting=19-1",
        "--set",
        "protocol.last_step=0",
    ]
    assert main(args) == 0
    mtime = (out / "ewc" / "step_0.pt").stat().st_mtime_ns
    assert main([*args, "--method-set", "ewc.weight=50"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "method.weight: 500.0 -> 50.0" in err
    assert (out / "ewc" / "step_0.pt").stat().st_mtime_ns == mtime


def test_config_diff_lists_dotted_keys():
    from incseg.config import config_diff

    diffs = config_diff({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 5}, "e": 0})
    assert diffs == ["b.c: 2 -> 5", "b.d: 3 -> '<absent>'", "e: '<absent>' -> 0"]


def test_methods_with_a_plain_first_step_share_it_and_match_their_own_runs(
    tiny_config_path, tmp_path, capsys
):
    out = tmp_path / "cmp"
    common = [
        str(tiny_config_path),
        "--no-progress",
        "--set",
        "protocol.setting=19-1",
        "--set",
        "train.tensorboard=off",
    ]
    assert main(["compare", *common, "--methods", "ft,lwf_mc,mib", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "mib: step 0 is the one of ft (plain cross-entropy), not retrained" in log
    assert "lwf_mc: step 0 is" not in log  # binary CE from step 0: trained on its own
    mib = json.loads((out / "mib" / "metrics.json").read_text())
    assert mib["steps"][0]["started_from"] == str(out / "ft")
    assert (
        "started_from" not in json.loads((out / "lwf_mc" / "metrics.json").read_text())["steps"][0]
    )
    # The shared step 0 changes nothing: MiB run on its own gives the same numbers at every step.
    assert main(["run", *common, "--set", "method.name=mib", "--out", str(tmp_path / "alone")]) == 0
    alone = json.loads((tmp_path / "alone" / "metrics.json").read_text())
    for shared, own in zip(mib["steps"], alone["steps"], strict=True):
        shared.pop("started_from", None)
        assert shared == own
    # the engine starts from the other run's step: its checkpoint copied unchanged, never rewritten
    assert (out / "mib" / "step_0.pt").read_bytes() == (out / "ft" / "step_0.pt").read_bytes()


def test_retrain_first_step_trains_it_for_every_method(tiny_config_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = [
        "compare",
        str(tiny_config_path),
        "--no-progress",
        "--set",
        "protocol.setting=19-1",
        "--set",
        "protocol.last_step=1",
        "--methods",
        "ft,mib",
        "--retrain-first-step",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "step 0 is the one of" not in capsys.readouterr().out
    assert "started_from" not in json.loads((out / "mib" / "metrics.json").read_text())["steps"][0]


def test_method_config_gives_rcil_its_architecture_and_add_ons_their_keys():
    from incseg.compare import method_config, parse_method_sets
    from incseg.config import config_from_dict

    base = config_from_dict({"model": {"backbone": "tiny"}, "method": {"name": "mib"}})
    assert method_config(base, "rcil").model.architecture == "rcil"
    assert method_config(base, "mib").model.architecture == "deeplabv3"
    sets = parse_method_sets(["mib+ucd.ucd.weight=0.5"], ["mib", "mib+ucd"])
    ucd = method_config(base, "mib+ucd", sets["mib+ucd"])
    assert ucd.method.build().addons[0].weight == 0.5


def test_a_memory_variant_is_its_method_with_the_official_memory_and_shares_step_0():
    from incseg.compare import memory_variant, method_config
    from incseg.config import load_config
    from incseg.engine.adopt import shared_steps_key

    assert memory_variant("ssul-m") == ("ssul", 100)
    assert memory_variant("star-m") == ("star", 50)
    assert memory_variant("mib-m") is None and memory_variant("dkd") is None
    base = load_config("demo")
    plain, with_memory = method_config(base, "dkd"), method_config(base, "dkd-m")
    assert (plain.method.params["memory_size"], with_memory.method.params["memory_size"]) == (
        0,
        100,
    )
    assert with_memory.model.architecture == "dkd"
    assert shared_steps_key(plain, 0) == shared_steps_key(with_memory, 0)
    assert shared_steps_key(plain, 1) != shared_steps_key(with_memory, 1)
    from incseg.compare import stores

    assert (stores(plain), stores(with_memory)) == ("nothing", "images (100)")
    assert method_config(base, "dkd-m", ["memory_size=7"]).method.params["memory_size"] == 7


def test_a_method_set_of_another_section_changes_that_methods_run_only():
    from incseg.compare import method_config
    from incseg.config import load_config
    from incseg.errors import ConfigError

    base = load_config("demo")
    dkd = method_config(base, "dkd-m", ["train.lr_incremental=0.001", "pos_weight=3"])
    assert (dkd.train.lr_incremental, dkd.method.params["pos_weight"]) == (0.001, 3)
    assert method_config(base, "mib").train.lr_incremental == base.train.lr_incremental
    with pytest.raises(ConfigError, match="train.lr_incremental"):
        method_config(base, "dkd", ["train.lr_incremental=-1"])


HOLD_LOCK = (
    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
    "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True); time.sleep(60)"
)


@contextlib.contextmanager
def _held_by_another_process(directory):
    """``directory``'s run-directory lock, held by another process (pid written: 4242)."""
    directory.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(directory / ".incseg.lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def _locked_now(directory) -> bool:
    """Whether a process holds ``directory``'s lock (this one included: flock is per open file)."""
    fd = os.open(directory / ".incseg.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_second_compare_into_the_same_out_is_refused_at_once(tiny_config_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", str(tiny_config_path), "--methods", "ft,mib", "--out", str(out)]
    with _held_by_another_process(out):
        assert main([*args, "--joint", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert f"run directory {out}: another incseg process (pid 4242) is writing it; wait" in err
    assert [p.name for p in out.iterdir()] == [".incseg.lock"]  # nothing read as finished, made


def test_compare_holds_its_out_and_each_methods_directory_while_it_runs(tiny_config_path, tmp_path):
    from incseg.compare import ComparisonOptions, run_comparison
    from incseg.config import load_config

    out, seen = tmp_path / "cmp", []

    def run(config, run_dir):  # trains nothing: the row fails for want of metrics
        seen.append((_locked_now(out), _locked_now(run_dir)))

    base = load_config(tiny_config_path, ["protocol.setting=19-1"])
    rows = run_comparison(base, ComparisonOptions(("ft", "ewc")), out, run=run)
    assert seen == [(True, True), (True, True)]
    assert rows[0]["failed"] == (
        f"{out / 'ft' / 'metrics.json'}: the run ended without the per-class IoU of its 2 step(s)"
    )
    assert not _locked_now(out) and not (out / "ft").exists()  # released; nothing left behind


def test_a_method_whose_directory_another_process_writes_is_recorded_failed(
    tiny_config_path, tmp_path, capsys
):
    out = tmp_path / "cmp"
    args = ["compare", str(tiny_config_path), "--methods", "ft", "--out", str(out), "--no-progress"]
    with _held_by_another_process(out / "ft"):
        assert main([*args, "--set", "protocol.setting=19-1"]) == 1
    assert "error: 1 method(s) failed: ft (see comparison.md)" in capsys.readouterr().err
    text = (out / "comparison.md").read_text()
    assert f"- ft: run directory {out / 'ft'}: another incseg process (pid 4242) is writing" in text
    assert [p.name for p in (out / "ft").iterdir()] == [".incseg.lock"]


@pytest.mark.parametrize(
    "content",
    ["caf\xe9".encode("latin-1"), b'{"steps": 5}', b'{"steps": [1, 2]}'],
    ids=["not UTF-8", "steps a number", "steps not objects"],
)
def test_an_unreadable_metrics_file_of_a_finished_method_is_rebuilt_from_its_checkpoints(
    tiny_config_path, tmp_path, capsys, content
):
    out = tmp_path / "cmp"
    args = ["compare", str(tiny_config_path), "--methods", "ft", "--out", str(out), "--no-progress"]
    args += ["--set", "protocol.setting=19-1", "--set", "train.tensorboard=off"]
    assert main(args) == 0
    table, step_1 = (out / "comparison.csv").read_text(), (out / "ft" / "step_1.pt").stat()
    (out / "ft" / "metrics.json").write_bytes(content)
    capsys.readouterr()
    assert main(args) == 0
    assert "ft: running into" in capsys.readouterr().out  # not taken as finished
    assert (out / "comparison.csv").read_text() == table
    assert (out / "ft" / "step_1.pt").stat().st_mtime_ns == step_1.st_mtime_ns  # not retrained
    kept = list((out / "ft").glob("metrics.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == content  # kept aside, not lost


def test_a_methods_config_file_that_is_not_utf8_is_named(tiny_config_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    (out / "ft").mkdir(parents=True)
    (out / "ft" / "config.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    args = ["compare", str(tiny_config_path), "--methods", "ewc,ft", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'ft' / 'config.yaml'}: not a UTF-8 text file")
    assert "Traceback" not in err and "\n" not in err.rstrip("\n")
    assert sorted(p.name for p in out.rglob("*")) == [
        ".incseg.lock",
        "config.yaml",
        "ft",
    ]  # none ran


def test_a_method_set_may_not_change_what_every_row_shares():
    from incseg.compare import parse_method_sets
    from incseg.errors import ConfigError

    refused = {
        "mib.protocol.setting=10-1": "protocol.setting is the same for every row (the table's "
        "columns: the setting's classes and steps, and its test images); use --set "
        "protocol.setting=10-1 for every row instead",
        "mib.data.num_train=10": "data.num_train is the same for every row (the images",
        "mib.model.backbone=resnet50": "model.backbone is the same for every row (the network",
        "mib.train.seed=3": "train.seed is the same for every row (the seed, so that rows",
        "mib.train={lr: 0.1}": "train replaces the whole section, train.seed included",
        "mib.name=ewc": "name would run another method in the row of mib; list that method in",
    }
    for text, expected in refused.items():
        with pytest.raises(ConfigError, match=re.escape(f"--method-set {text!r}: {expected}")):
            parse_method_sets([text], ["mib"])
    sets = ["mib.train.lr=0.1", "mib.model.architecture=rcil", "mib.kd_weight=5"]
    assert parse_method_sets(sets, ["mib"]) == {
        "mib": ["train.lr=0.1", "model.architecture=rcil", "kd_weight=5"]
    }
