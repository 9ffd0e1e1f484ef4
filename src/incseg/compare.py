"""``incseg compare``: several methods (and Joint) on the same setting, data and seed, as a table.

Each method runs into ``OUT/<method>`` (Joint into ``OUT/joint``, the ``offline`` setting). A method
whose run directory already holds a finished run (``summary.md`` and every step in
``metrics.json``) is not run again. Outputs: ``comparison.md``, ``comparison.csv`` and
``comparison.png``, in the layout of the MiB paper's Table 1: old / new / all mIoU after the last
step, plus all-mIoU averaged over steps.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from incseg.config import Config, MethodConfig, config_from_dict
from incseg.errors import ConfigError
from incseg.methods import METHODS
from incseg.protocol import get_setting, step_info

JOINT = "joint"


def method_config(base: Config, name: str) -> Config:
    """``base`` with method ``name``; the base's method hyperparameters carry over only to the
    same method (they are not valid for others)."""
    if name not in METHODS:
        raise ConfigError(f"--methods: unknown method {name!r}; valid choices: {sorted(METHODS)}")
    raw = base.to_dict()
    raw["method"] = dict(raw["method"]) if base.method.name == name else {"name": name}
    return config_from_dict(raw)


def joint_config(base: Config, epochs: int | None) -> Config:
    """Joint training: the ``offline`` setting with fine-tuning (``epochs`` default: step 0's)."""
    train = dataclasses.replace(base.train, epochs=epochs if epochs is not None else base.train.epochs)
    proto = dataclasses.replace(base.protocol, setting="offline", last_step=None)
    return dataclasses.replace(base, name=f"{base.name}-joint", protocol=proto, train=train,
                               method=MethodConfig(name="ft"))  # fmt: skip


def is_finished(run_dir: Path, num_steps: int) -> bool:
    """True when ``run_dir`` holds a completed run of ``num_steps`` steps."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return (run_dir / "summary.md").is_file() and len(metrics.get("steps", [])) == num_steps


def _mean(values: Sequence[float | None]) -> float:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def comparison_row(label: str, metrics: dict, old_names: set[str]) -> dict:
    """Old / new / all mIoU after the last step, grouped by class *name* (so Joint's single step is
    split like the incremental runs), and the all-mIoU averaged over steps."""
    per_class = metrics["steps"][-1]["per_class"]
    return {
        "method": label,
        "old": _mean([v for n, v in per_class.items() if n in old_names]),
        "new": _mean([v for n, v in per_class.items() if n not in old_names]),
        "all": _mean(list(per_class.values())),
        "avg": _mean([s["miou_all"] for s in metrics["steps"]]),
        "old_per_step": [_mean([v for n, v in s["per_class"].items() if n in old_names]) for s in metrics["steps"]],
        "all_per_step": [s["miou_all"] for s in metrics["steps"]],
    }


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def write_outputs(rows: list[dict], out: Path, title: str, old_range: str, new_range: str) -> None:
    """comparison.md / .csv / .png from :func:`comparison_row` rows."""
    lines = [f"# {title}", "", "mIoU (%) after the last step; avg = all-classes mIoU averaged over steps.", "",
             f"| method | old ({old_range}) | new ({new_range}) | all | avg |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['method']} | {_pct(r['old'])} | {_pct(r['new'])} | {_pct(r['all'])} | {_pct(r['avg'])} |"
              for r in rows]  # fmt: skip
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    with (out / "comparison.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", f"old_{old_range}", f"new_{new_range}", "all", "avg_over_steps"])
        for r in rows:
            writer.writerow([r["method"], *(f"{100 * r[k]:.2f}" for k in ("old", "new", "all", "avg"))])
    _plot(rows, out / "comparison.png", title, old_range)


def _plot(rows: list[dict], path: Path, title: str, old_range: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        steps = range(len(r["all_per_step"]))
        style = {"linestyle": "--"} if r["method"] == JOINT else {"marker": "o"}
        axes[0].plot(steps, [100 * v for v in r["all_per_step"]], label=r["method"], **style)
        axes[1].plot(steps, [100 * v for v in r["old_per_step"]], label=r["method"], **style)
    for ax, name in zip(axes, ("all seen classes", f"old classes ({old_range})"), strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel("mIoU (%)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_comparison(
    base: Config,
    methods: Sequence[str],
    out: Path,
    *,
    joint: bool,
    joint_epochs: int | None,
    run: Callable[[Config, Path], None],
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Run (or reuse) every method, then write the comparison files into ``out``.

    Args:
        run: ``run(config, run_dir)`` trains one configuration (``run_protocol`` in the CLI).
    """
    setting = get_setting(base.family, base.protocol.setting)
    last = setting.num_steps - 1 if base.protocol.last_step is None else base.protocol.last_step
    info = step_info(setting, last)
    old_names = set(info.class_names[: info.num_base_channels])
    jobs = [(m, method_config(base, m)) for m in methods]
    if joint:
        jobs.append((JOINT, joint_config(base, joint_epochs)))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, config in jobs:
        run_dir = out / label
        steps = 1 if label == JOINT else last + 1
        if is_finished(run_dir, steps):
            log(f"[compare] {label}: finished run found in {run_dir}, not re-run")
        else:
            log(f"[compare] {label}: running into {run_dir}")
            run(config, run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rows.append(comparison_row(label, metrics, old_names))
    title = f"{base.data.dataset} {setting.name} ({base.protocol.mode})"
    new_range = f"{info.num_base_channels}-{info.num_channels - 1}"
    write_outputs(rows, out, title, f"0-{info.num_base_channels - 1}", new_range)
    log((out / "comparison.md").read_text())
    return rows
