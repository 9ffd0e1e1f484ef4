"""``incseg compare`` over seeds and class orders (mean, spread, runs counted, resume, dry run)
and the published number beside a run's result (``incseg.published``)."""

import csv
import json
import math
import statistics

import pytest
import torch

from incseg.cli import main
from incseg.compare import ComparisonOptions, run_comparison
from incseg.compare_table import aggregate, markdown
from incseg.config import load_config
from incseg.engine.run import run_protocol
from incseg.metrics import StepReport
from incseg.protocol import step_info
from incseg.published import Match, Published, published_cell, published_for, summary_lines

FAST = ["--no-progress", "--set", "protocol.setting=19-1", "--set", "train.tensorboard=off"]


def _row(method, old, new, all_, with_bg, avg, **extra):
    return {
        "method": method,
        "old": old,
        "new": new,
        "all": all_,
        "with_bg": with_bg,
        "avg": avg,
        "old_per_step": [old + 0.1, old],
        "all_per_step": [all_ + 0.1, all_],
        **extra,
    }


def test_aggregate_gives_mean_sample_std_and_counts_by_hand():
    runs = [
        [_row("mib", 0.50, 0.20, 0.40, 0.45, 0.42), _row("ft", 0.10, 0.30, 0.15, 0.2, 0.3)],
        [_row("mib", 0.60, 0.10, 0.50, 0.55, 0.44), {"method": "ft", "failed": "nan loss"}],
        [_row("mib", 0.70, 0.30, 0.60, 0.65, 0.46), _row("ft", 0.30, 0.10, 0.25, 0.3, 0.4)],
    ]
    runs[1][1] |= {k: math.nan for k in ("old", "new", "all", "with_bg", "avg")}
    runs[1][1] |= {"old_per_step": [], "all_per_step": [], "cell": "seed 1, default"}
    mib, ft = aggregate(runs)
    assert mib["n"] == 3 and mib["planned"] == 3
    assert mib["old"] == pytest.approx(0.6)
    assert mib["old_std"] == pytest.approx(0.1)  # sqrt(((-.1)^2 + 0 + .1^2) / 2)
    assert mib["new_std"] == pytest.approx(0.1)
    assert mib["avg_std"] == pytest.approx(0.02)
    assert mib["all_per_step"] == pytest.approx([0.6, 0.5])
    assert mib["all_per_step_std"] == pytest.approx([0.1, 0.1])
    assert ft["n"] == 2 and ft["planned"] == 3
    assert ft["old"] == pytest.approx(0.2) and ft["old_std"] == pytest.approx(math.sqrt(0.02))
    assert ft["failed"] == "seed 1, default: nan loss"
    table = markdown(
        [mib, ft], "t", {"old": "1-2", "new": "3", "all": "1-3", "with_bg": "0-3"}, "x"
    )
    assert (
        "| mib |  | 60.0 ± 10.0 | 20.0 ± 10.0 | 50.0 ± 10.0 | 55.0 ± 10.0 | 44.0 ± 2.0 | 3/3 |"
        in (table)
    )
    assert "| 2/3 |" in table and "- ft: seed 1, default: nan loss" in table


def test_a_single_run_has_no_spread():
    (row,) = aggregate([[_row("mib", 0.5, 0.2, 0.4, 0.45, 0.42)]])
    assert row["n"] == 1 and math.isnan(row["old_std"])
    table = markdown([row], "t", {"old": "1", "new": "2", "all": "1-2", "with_bg": "0-2"}, None)
    assert "| mib |  | 50.0 | 20.0 | 40.0 | 45.0 | 42.0 | 1/1 | - |" in table


def _numbers(path):
    return list(csv.DictReader(path.open()))


def test_a_two_seed_compare_gives_the_mean_and_std_of_its_runs(tiny_config_path, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", str(tiny_config_path), "--methods", "ft,mib", "--seeds", "0,1"]
    assert main([*args, "--out", str(out), *FAST]) == 0
    for cell in ("seed0-default", "seed1-default"):
        assert (out / cell / "mib" / "summary.md").is_file()
        assert (out / cell / "comparison.md").is_file()
    runs = _numbers(out / "runs.csv")
    assert [(r["seed"], r["method"]) for r in runs] == [("0", "ft"), ("0", "mib")] + [
        ("1", "ft"),
        ("1", "mib"),
    ]
    table = {r["method"]: r for r in _numbers(out / "comparison.csv")}
    for method in ("ft", "mib"):
        mine = []  # each run's all / with_bg from its own metrics.json
        for cell in ("seed0-default", "seed1-default"):
            metrics = json.loads((out / cell / method / "metrics.json").read_text())
            ious = metrics["steps"][-1]["per_class"]
            kept = [v for v in ious.values() if v is not None]
            rest = [v for n, v in ious.items() if n != "background" and v is not None]
            mine.append((100 * statistics.fmean(rest), 100 * statistics.fmean(kept)))
        for index, head in enumerate(("all_1-20", "with_bg_0-20")):
            values = [m[index] for m in mine]
            assert float(table[method][head]) == pytest.approx(statistics.fmean(values), abs=0.006)
            assert float(table[method][f"{head}_std"]) == pytest.approx(
                statistics.stdev(values), abs=0.006
            )
        assert table[method]["runs"] == "2"
    mib = [r for r in runs if r["method"] == "mib"]
    assert mib[0]["all"] != mib[1]["all"]  # the seeds' runs differ: the spread is not zero
    # the two seeds trained different step-0 models; step 0 is shared within a seed only
    a = torch.load(out / "seed0-default" / "ft" / "step_0.pt", weights_only=False)
    b = torch.load(out / "seed1-default" / "ft" / "step_0.pt", weights_only=False)
    assert a["config"]["train"]["seed"] == 0 and b["config"]["train"]["seed"] == 1
    text = (out / "comparison.md").read_text()
    assert "2 seed(s) (0, 1) x 1 class order(s) (default)" in text and "| 2/2 |" in text


def test_orders_permute_each_cells_classes(tiny_config_path, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", str(tiny_config_path), "--methods", "ft", "--orders", "default,random:3"]
    assert main([*args, "--out", str(out), *FAST]) == 0
    default = json.loads((out / "seed0-default" / "ft" / "metrics.json").read_text())
    shuffled = json.loads((out / "seed0-random-3" / "ft" / "metrics.json").read_text())
    new_default = list(default["steps"][1]["per_class"])[-1]
    new_shuffled = list(shuffled["steps"][1]["per_class"])[-1]
    assert new_default == "tvmonitor" and new_shuffled != "tvmonitor"
    config = load_config(tiny_config_path, ["protocol.setting=19-1", "protocol.order=random:3"])
    assert step_info(config.setting, 1).class_names[-1] == new_shuffled


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--orders", "default,bogus", "protocol.order: 'bogus'"),
        ("--orders", "random:1,random:1", "an order is listed twice"),
        ("--orders", "[1,2]", "--set protocol.order=[...]"),
        ("--seeds", "0,x", "'x' is not a non-negative integer"),
        ("--seeds", "1,1", "a seed is listed twice"),
    ],
)
def test_malformed_seeds_and_orders_stop_before_anything_runs(
    tiny_config_path, tmp_path, capsys, flag, value, message
):
    out = tmp_path / "cmp"
    args = ["compare", str(tiny_config_path), "--methods", "ft", flag, value, "--out", str(out)]
    assert main([*args, *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_killed_multi_seed_compare_resumes_without_rerunning_finished_runs(
    tiny_config_path, tmp_path
):
    base = load_config(tiny_config_path, ["protocol.setting=19-1", "train.tensorboard=off"])
    options = ComparisonOptions(methods=("ft", "mib"), seeds=(0, 1))
    out = tmp_path / "cmp"
    calls = []

    def killed_at_third(config, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill in the middle of seed 1's first run
        run_protocol(config, path, progress=False, resume=True)

    with pytest.raises(KeyboardInterrupt):
        run_comparison(base, options, out, run=killed_at_third)
    finished = {p: (p / "step_1.pt").stat().st_mtime_ns for p in calls[:2]}
    calls.clear()

    def counted(config, path):
        calls.append(path)
        run_protocol(config, path, progress=False, resume=True)

    rows = run_comparison(base, options, out, run=counted)
    assert calls == [out / "seed1-default" / "ft", out / "seed1-default" / "mib"]
    assert {p: (p / "step_1.pt").stat().st_mtime_ns for p in finished} == finished
    assert [r["n"] for r in rows] == [2, 2]


def test_dry_run_counts_runs_and_image_passes(tiny_config_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", str(tiny_config_path), "--methods", "ft,mib", "--seeds", "0,1"]
    assert main([*args, "--out", str(out), *FAST, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "2 cell(s) x 2 row(s)" in plan
    assert "4 of 4 runs to make" in plan
    assert plan.count("step 0 from an earlier row") == 2  # mib takes ft's, per seed
    assert not out.exists()
    assert main([*args, "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main([*args, "--out", str(out), *FAST, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "0 of 4 runs to make; image passes: 0 student" in plan
    assert plan.count("finished: read, not re-run") == 4


def test_published_number_is_found_for_its_row_with_the_differences():
    config = load_config("voc/15-5-overlap-ssul", ["model.backbone=tiny", "train.epochs=1"])
    match = published_for(config)
    assert match.published == Published(
        "voc/15-5-overlap-ssul", 71.22, "SSUL README, with background", "with_bg"
    )
    assert match.differences == ("model.backbone: 'resnet101' -> 'tiny'", "train.epochs: 50 -> 1")
    memory = load_config("voc/15-5-overlap-ssul", ["method.memory_size=100"])
    assert published_for(memory).published.miou == 73.02  # SSUL-M's row
    assert published_for(load_config("demo")) is None
    assert published_for(load_config("voc/15-5-overlap-ssul", ["protocol.order=random:1"])) is None


def test_summary_reads_the_published_number_in_its_own_grouping():
    config = load_config("voc/15-5-overlap-ssul")
    info = step_info(config.setting, 1)
    matrix = torch.eye(info.num_channels) * 10
    matrix[0, 1] = 10  # background: IoU 10 / 20 = 0.5; class 1: 10 / 20 = 0.5; others 1
    report = StepReport.from_confusion(matrix, info)
    lines = "\n".join(summary_lines(config, report, config.setting.num_steps))
    with_bg = (0.5 + 0.5 + 19) / 21
    assert f"this run's w/ bg (every class with background): {100 * with_bg:.2f}%" in lines
    assert f"difference {100 * with_bg - 71.22:+.2f}" in lines
    assert "This run's config is `voc/15-5-overlap-ssul`'s." in lines
    early = step_info(config.setting, 0)
    report0 = StepReport.from_confusion(torch.eye(early.num_channels), early)
    assert "not comparable" in "\n".join(summary_lines(config, report0, config.setting.num_steps))


def test_published_cell_names_grouping_source_and_difference():
    match = Match(Published("voc/x", 44.7, "CoMFormer paper, old classes 1-100", "old"), ())
    assert published_cell(match, 0.401) == (
        "44.7 (old; CoMFormer paper, old classes 1-100), run -4.6"
    )
    assert published_cell(None, 0.5) == "-"
    assert "not comparable: why" in published_cell(match, 0.4, "why")
