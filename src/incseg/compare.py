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
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from incseg.config import Config, MethodConfig, apply_override, config_from_dict
from incseg.engine.adopt import adopt_steps, shared_steps_key
from incseg.engine.distributed import SINGLE, DistInfo
from incseg.engine.rundir import RunDir
from incseg.errors import ConfigError, IncsegError
from incseg.methods import check_method_name, method_class
from incseg.protocol import get_setting, step_info

log = logging.getLogger(__name__)

JOINT = "joint"


RUN_SECTIONS = ("data", "protocol", "model", "train")  # --method-set NAME.train.lr=...
MEMORY_SUFFIX = "-m"  # ssul-m: the method with its exemplar memory (Method.memory_variant)


def memory_variant(name: str) -> tuple[str, int] | None:
    """``"ssul-m"`` -> ``("ssul", 100)``: the method and the memory size of its -M variant
    (``Method.memory_variant``, the official VOC size); None for any other name."""
    if not name.endswith(MEMORY_SUFFIX):
        return None
    base = name[: -len(MEMORY_SUFFIX)]
    try:
        size = getattr(method_class(base), "memory_variant", 0)
    except ConfigError:
        return None
    return (base, size) if size else None


def method_config(base: Config, name: str, overrides: Sequence[str] = ()) -> Config:
    """``base`` with method ``name``; the base's method hyperparameters carry over only to the
    same method (they are not valid for others), and a method that trains its own architecture
    (RCIL) gets it. ``NAME-m`` is method NAME with its exemplar memory (:func:`memory_variant`).
    ``overrides`` are ``KEY=VALUE`` assignments
    inside this method's section (``weight=50``), validated like ``--set method.KEY=VALUE``, or
    of another section for this method's run only (``train.lr=0.005``), like ``--set``."""
    variant = memory_variant(name)
    if variant is not None:
        name, size = variant
        overrides = [f"memory_size={size}", *overrides]
    try:
        check_method_name(name)
    except ConfigError as err:
        raise ConfigError(f"--methods: {err}") from None
    raw = base.to_dict()
    raw["method"] = dict(raw["method"]) if base.method.name == name else {"name": name}
    needs = getattr(method_class(name), "architecture", None)
    if needs is not None:  # RCIL trains its own model: the other methods keep the base's
        raw["model"]["architecture"] = needs
    for assignment in overrides:  # a section's key (train.lr=...) is this method's run's
        section = assignment.partition("=")[0].split(".")[0].strip()
        apply_override(raw if section in RUN_SECTIONS else raw["method"], assignment)
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"--method-set for {name}: {err}") from None


def parse_method_sets(assignments: Sequence[str], methods: Sequence[str]) -> dict[str, list[str]]:
    """``["ewc.weight=50", ...]`` -> ``{"ewc": ["weight=50"], ...}``; the method must be compared."""
    per_method: dict[str, list[str]] = {}
    for text in assignments:
        name, dot, rest = text.partition(".")
        if not dot or "=" not in rest:
            raise ConfigError(
                f"--method-set {text!r}: expected METHOD.KEY=VALUE, e.g. ewc.weight=50"
            )
        if name not in methods:
            raise ConfigError(
                f"--method-set {text!r}: {name!r} is not in --methods {list(methods)}"
            )
        per_method.setdefault(name, []).append(rest)
    return per_method


def joint_config(base: Config, epochs: int | None) -> Config:
    """Joint training: the ``offline`` setting with fine-tuning (``epochs`` default: step 0's)."""
    train = dataclasses.replace(
        base.train, epochs=epochs if epochs is not None else base.train.epochs
    )
    proto = dataclasses.replace(base.protocol, setting="offline", last_step=None)
    return dataclasses.replace(
        base, name=f"{base.name}-joint", protocol=proto, train=train, method=MethodConfig(name="ft")
    )


def _mean(values: Sequence[float | None]) -> float:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def comparison_row(label: str, metrics: dict, old_names: set[str], background: str) -> dict:
    """mIoU after the last step, grouped by class *name* (so Joint's single step is split like the
    incremental runs): old / new / all as the MiB paper (``background`` excluded), ``with_bg``
    over every class; ``avg`` = the paper's "all" averaged over steps."""

    def groups(per_class: dict) -> tuple[float, float, float]:
        old = _mean([v for n, v in per_class.items() if n in old_names and n != background])
        return (
            old,
            _mean([v for n, v in per_class.items() if n != background]),
            _mean(list(per_class.values())),
        )

    per_class = metrics["steps"][-1]["per_class"]
    old, all_, with_bg = groups(per_class)
    per_step = [groups(s["per_class"]) for s in metrics["steps"]]
    return {
        "method": label,
        "old": old,
        "new": _mean([v for n, v in per_class.items() if n not in old_names]),
        "all": all_,
        "with_bg": with_bg,
        "avg": _mean([a for _, a, _ in per_step]),
        "old_per_step": [o for o, _, _ in per_step],
        "all_per_step": [a for _, a, _ in per_step],
    }


def failed_row(label: str, reason: str) -> dict:
    """A row for a method whose run stopped with an error: no numbers, the reason kept."""
    nan = math.nan
    return {
        "method": label,
        "old": nan,
        "new": nan,
        "all": nan,
        "with_bg": nan,
        "avg": nan,
        "old_per_step": [],
        "all_per_step": [],
        "failed": reason,
    }


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


COLUMNS = ("old", "new", "all", "with_bg", "avg")


def write_outputs(rows: list[dict], out: Path, title: str, ranges: dict[str, str]) -> None:
    """comparison.md / .csv / .png from :func:`comparison_row` rows; ``ranges`` names the
    classes of ``old``, ``new``, ``all`` and ``with_bg`` (e.g. ``"1-15"``)."""
    heads = [
        f"old ({ranges['old']})",
        f"new ({ranges['new']})",
        f"all ({ranges['all']})",
        f"w/ bg ({ranges['with_bg']})",
        "avg",
    ]
    note = (
        "mIoU (%) after the last step. Old / new / all as the MiB paper groups them (background "
        "excluded); w/ bg: every class with background (cssegmentation's and PLOP's mIoU); avg: "
        "the paper's all averaged over steps."
    )
    lines = [
        f"# {title}",
        "",
        note,
        "",
        f"| method | {' | '.join(heads)} |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['method']} | " + " | ".join(_pct(r[k]) for k in COLUMNS) + " |" for r in rows]
    failures = [r for r in rows if r.get("failed")]
    if failures:
        lines += ["", "Failed runs (no numbers):", ""]
        lines += [f"- {r['method']}: {r['failed']}" for r in failures]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    with (out / "comparison.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "method",
                f"old_{ranges['old']}",
                f"new_{ranges['new']}",
                f"all_{ranges['all']}",
                f"with_bg_{ranges['with_bg']}",
                "avg_over_steps",
            ]
        )
        for r in rows:
            writer.writerow(
                [r["method"], *("" if math.isnan(r[k]) else f"{100 * r[k]:.2f}" for k in COLUMNS)]
            )
    _plot(rows, out / "comparison.png", title, ranges)


def _plot(rows: list[dict], path: Path, title: str, ranges: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    # Twenty distinct colours, then the markers change, so that many methods stay apart.
    colours = plt.get_cmap("tab20").colors
    markers = "osD^v"
    for index, r in enumerate(rows):
        if r["method"] == JOINT:  # one step: its final numbers are the upper bound at every step
            for ax, key in zip(axes, ("all", "old"), strict=True):
                ax.axhline(100 * r[key], linestyle="--", color="black", alpha=0.6, label="joint")
            continue
        steps = range(len(r["all_per_step"]))
        style = {
            "label": r["method"],
            "color": colours[index % len(colours)],
            "marker": markers[index // len(colours) % len(markers)],
        }
        axes[0].plot(steps, [100 * v for v in r["all_per_step"]], **style)
        axes[1].plot(steps, [100 * v for v in r["old_per_step"]], **style)
    num_steps = max((len(r["all_per_step"]) for r in rows if r["method"] != JOINT), default=1)
    names = (
        f"all seen classes, background excluded ({ranges['all']})",
        f"old classes ({ranges['old']})",
    )
    for ax, name in zip(axes, names, strict=True):
        ax.set_xticks(range(num_steps))
        ax.set_xlabel("step")
        ax.set_ylabel("mIoU (%)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
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
    dist: DistInfo = SINGLE,
    method_sets: dict[str, list[str]] | None = None,
    share_first_step: bool = True,
) -> list[dict]:
    """Run (or reuse) every method, then write the comparison files into ``out``.

    Under ``torchrun`` every rank runs this (each method's training is distributed); only
    rank 0 logs and writes the comparison files.

    A method whose run fails with a user-facing error (e.g. a non-finite loss) is recorded as
    failed, with the message, in ``comparison.md``; the other methods still run. Running the
    comparison again retries it.

    Args:
        run: ``run(config, run_dir)`` trains one configuration, continuing the finished steps
            of an interrupted run or the step 0 adopted from another method's run
            (``run_protocol(..., resume=True)`` in the CLI).
        dist: this process's identity; rank 0 logs and writes the comparison files.
        method_sets: per-method ``KEY=VALUE`` overrides, from :func:`parse_method_sets`.
        share_first_step: methods whose step 0 is plain cross-entropy (FT, LwF, ILT, MiB; see
            ``Method.plain_first_step``) and whose configs differ only in the method train step 0
            once: later ones start from the first one's finished step 0 (copied unchanged).
    """
    run_one = run
    setting = get_setting(base.family, base.protocol.setting)
    last = setting.num_steps - 1 if base.protocol.last_step is None else base.protocol.last_step
    info = step_info(setting, last)
    old_names = set(info.class_names[: info.num_base_channels])
    method_sets = method_sets or {}
    jobs = [(m, method_config(base, m, method_sets.get(m, ()))) for m in methods]
    if joint:
        jobs.append((JOINT, joint_config(base, joint_epochs)))
    for label, config in jobs:
        RunDir(out / label).check_config(config, "reuse or continue")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    first_steps: dict[str, Path] = {}  # shared_steps_key -> a run directory with that step 0 done
    for label, config in jobs:
        run = RunDir(out / label)
        steps = 1 if label == JOINT else last + 1
        # Equal keys train the same step 0: plain-first-step methods, and a method with and
        # without its memory (shared_steps_key).
        shared = share_first_step and label != JOINT
        key = shared_steps_key(config, 0) if shared else None
        if run.is_finished(steps):
            log.info(f"[compare] {label}: finished run found in {run.path}, not re-run")
        else:
            source = first_steps.get(key)
            plain = method_class(config.method.name).plain_first_step
            why = "plain cross-entropy" if plain else "the same step 0; the memory starts at step 1"
            log.info(f"[compare] {label}: running into {run.path}")
            try:
                if source is not None and steps > 1 and not run.step_file(0).exists():
                    log.info(
                        f"[compare] {label}: step 0 is the one of {source.name} ({why}), not retrained"
                    )
                    adopt_steps(run.path, config, source, 0, dist)
                run_one(config, run.path)
            except IncsegError as err:
                log.info(f"[compare] {label}: FAILED: {err}")
                rows.append(failed_row(label, str(err)))
                continue
        rows.append(
            comparison_row(
                label, run.read_metrics() or {"steps": []}, old_names, info.class_names[0]
            )
        )
        if key is not None:
            first_steps.setdefault(key, run.path)
    title = f"{base.data.dataset} {setting.name} ({base.protocol.mode})"
    last_channel, base = info.num_channels - 1, info.num_base_channels
    ranges = {
        "old": f"1-{base - 1}",
        "new": f"{base}-{last_channel}",
        "all": f"1-{last_channel}",
        "with_bg": f"0-{last_channel}",
    }
    if dist.is_main:  # under torchrun every rank trains; rank 0 writes
        write_outputs(rows, out, title, ranges)
        log.info((out / "comparison.md").read_text())
    return rows
