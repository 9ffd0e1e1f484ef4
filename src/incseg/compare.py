"""``incseg compare``: several methods (and Joint) on the same setting, data and seed, as a table.

Each method runs into ``OUT/<method>`` (Joint into ``OUT/joint``, the ``offline`` setting). A method
whose run directory already holds a finished run (``summary.md`` and every step in
``metrics.json``) is not run again. Outputs: ``comparison.md``, ``comparison.csv`` and
``comparison.png``, in the layout of the MiB paper's Table 1: old / new / all mIoU after the last
step, plus all-mIoU averaged over steps. ``OUT`` is locked for the whole comparison and each
method's directory while it is read or run, as ``incseg run`` locks its run directory
(:meth:`incseg.engine.rundir.RunDir.locked`), so no two processes write one directory.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from incseg.config import Config, MethodConfig, apply_override, config_from_dict
from incseg.engine.adopt import adopt_steps, shared_steps_key
from incseg.engine.distributed import SINGLE, DistInfo
from incseg.engine.rundir import METRICS_FILE, RunDir
from incseg.errors import ConfigError, IncsegError
from incseg.methods import check_method_name, method_class
from incseg.protocol import StepInfo, step_info

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


# What every row of a comparison shares, so that its rows differ by their method alone (and why);
# a --method-set may not change these (check_method_set).
SHARED = {
    "protocol": "the table's columns: the setting's classes and steps, and its test images",
    "data": "the images every method trains and is tested on",
    "model": "the network every method starts from",
    "train.seed": "the seed, so that rows differ by their method and not by noise",
}
ROW_KEYS = ("model.architecture",)  # a method's own network (RCIL's, SSUL's...): per row


def check_method_set(method: str, assignment: str) -> None:
    """Refuse a ``--method-set METHOD.KEY=VALUE`` whose key every row shares (:data:`SHARED`).

    The protocol and the data make the table's columns and what each number is measured on; the
    backbone (``model.*`` but ``model.architecture``, which RCIL, SSUL, DKD and STAR bring as part
    of the method) is where every method starts. ``train.seed`` changes only noise, not the
    columns, but the comparison promises one seed for every row (docs/comparison.md: "the same
    setting, data and seed"): a per-row seed would put seed noise into the differences the table
    is read for, and would also keep a method from sharing another's step 0. ``name`` is the
    method's name, which ``--methods`` gives each row. A whole section (``train={...}``) replaces
    every key of it, shared ones included, so it is refused as they are.

    Raises:
        ConfigError: names the ``--method-set``, the key and what to write instead.
    """
    key = assignment.partition("=")[0].strip()
    given = f"--method-set {method + '.' + assignment!r}"
    if key == "name":
        raise ConfigError(
            f"{given}: name would run another method in the row of {method}; list that method in "
            "--methods instead"
        )
    if key in ROW_KEYS:
        return
    for shared, why in SHARED.items():
        if key == shared or key.startswith(f"{shared}."):
            raise ConfigError(
                f"{given}: {key} is the same for every row ({why}); use --set {assignment} for "
                "every row instead"
            )
        if shared.startswith(f"{key}."):
            raise ConfigError(
                f"{given}: {key} replaces the whole section, {shared} included, which is the same "
                f"for every row ({why}); set its keys one by one: {method}.{key}.KEY=VALUE"
            )


def parse_method_sets(assignments: Sequence[str], methods: Sequence[str]) -> dict[str, list[str]]:
    """``["ewc.weight=50", ...]`` -> ``{"ewc": ["weight=50"], ...}``; the method must be compared
    and the key one that rows may differ in (:func:`check_method_set`)."""
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
        check_method_set(name, rest)
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


def stores(config: Config) -> str:
    """What a method keeps of earlier steps' data besides its model, for the tables:
    ``"images (N)"`` with an exemplar memory (``method.memory_size``), else ``"nothing"``."""
    size = config.method.params.get("memory_size", 0)
    return f"images ({size})" if size else "nothing"


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
        "the paper's all averaged over steps; stores: what the method keeps of earlier steps' "
        "images (replay) besides its model."
    )
    lines = [
        f"# {title}",
        "",
        note,
        "",
        f"| method | stores | {' | '.join(heads)} |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r.get('stores', '')} | "
        + " | ".join(_pct(r[k]) for k in COLUMNS)
        + " |"
        for r in rows
    ]
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
                "stores",
            ]
        )
        for r in rows:
            numbers = ("" if math.isnan(r[k]) else f"{100 * r[k]:.2f}" for k in COLUMNS)
            writer.writerow([r["method"], *numbers, r.get("stores", "")])
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


@dataclasses.dataclass(frozen=True)
class ComparisonOptions:
    """What a comparison runs: ``incseg compare``'s options (built by its CLI handler).

    Attributes:
        methods: a row each, in this order (``--methods``; ``NAME-m``: :func:`memory_variant`).
        joint: a last row for Joint, the ``offline`` setting (``--joint``).
        joint_epochs: Joint's epochs (default: step 0's ``train.epochs``).
        method_sets: per-method ``KEY=VALUE`` overrides, from :func:`parse_method_sets`.
        share_first_step: methods that train the same step 0 (plain cross-entropy: FT, LwF, ILT,
            MiB; CoMFormer and its FT; ``Method.first_step_key``) and whose configs differ only
            in the method train step 0
            once: later ones start from the first one's finished step 0 (copied unchanged).
            False: ``--retrain-first-step``.
    """

    methods: tuple[str, ...]
    joint: bool = False
    joint_epochs: int | None = None
    method_sets: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    share_first_step: bool = True

    def jobs(self, base: Config) -> list[tuple[str, Config]]:
        """(row label, its run's config) per row; every config validated before anything runs."""
        jobs = [(m, method_config(base, m, self.method_sets.get(m, ()))) for m in self.methods]
        if self.joint:
            jobs.append((JOINT, joint_config(base, self.joint_epochs)))
        return jobs


@dataclasses.dataclass(frozen=True)
class _Table:
    """The table's columns: the base config's setting after its last step."""

    title: str
    last: int  # the last step of the incremental rows
    info: StepInfo  # of that step: its classes, and which of them are old

    @classmethod
    def of(cls, base: Config) -> _Table:
        setting = base.setting
        last = setting.num_steps - 1 if base.protocol.last_step is None else base.protocol.last_step
        title = f"{base.data.dataset} {setting.name} ({base.protocol.mode})"
        return cls(title, last, step_info(setting, last))

    def steps(self, label: str) -> int:
        return 1 if label == JOINT else self.last + 1

    def row(self, label: str, metrics: dict[str, Any]) -> dict:
        old_names = set(self.info.class_names[: self.info.num_base_channels])
        return comparison_row(label, metrics, old_names, self.info.class_names[0])

    def ranges(self) -> dict[str, str]:
        """Which classes each column averages, e.g. ``{"old": "1-15", ...}``."""
        last_channel, base = self.info.num_channels - 1, self.info.num_base_channels
        return {
            "old": f"1-{base - 1}",
            "new": f"{base}-{last_channel}",
            "all": f"1-{last_channel}",
            "with_bg": f"0-{last_channel}",
        }


def table_metrics(run: RunDir, num_steps: int) -> dict[str, Any] | None:
    """The metrics of the finished run of ``num_steps`` steps in ``run``, when ``metrics.json``
    holds every step's per-class IoU (what its row is made of); None otherwise.

    A ``metrics.json`` that is missing, not UTF-8 JSON (``RunDir.read_metrics``) or short of a
    step leaves the run unfinished rather than an error: the run is then resumed, which checks
    each step checkpoint (checksum, and that it is this config's) and rebuilds the entries from
    them, keeping the unreadable file aside (``RunDir.finished``). The checkpoints are the record
    of what was trained; a run is never called finished on the word of a file that cannot be read.
    """
    metrics = run.read_metrics()
    if metrics is None or not run.is_finished(num_steps):
        return None
    if all(isinstance(s.get("per_class"), dict) for s in metrics["steps"]):
        return metrics
    return None


def _lock_alone(path: Path) -> AbstractContextManager[None]:
    return RunDir(path).locked()


@dataclasses.dataclass
class _Members:
    """Brings the comparison's runs up to date, one at a time, each under its directory's lock."""

    out: Path
    run: Callable[[Config, Path], None]
    lock: Callable[[Path], AbstractContextManager[None]]
    dist: DistInfo
    share_first_step: bool
    # shared_steps_key -> the directory of a finished run with that step 0
    first_steps: dict[str, Path] = dataclasses.field(default_factory=dict)

    def row(self, label: str, config: Config, table: _Table) -> dict:
        """``label``'s row; a failed row with the message of a user-facing error that stopped it
        (another process writing its directory, a non-finite loss...)."""
        member = RunDir(self.out / label)
        # Equal keys train the same step 0: plain-first-step methods, and a method with and
        # without its memory (shared_steps_key).
        shared = self.share_first_step and label != JOINT
        key = shared_steps_key(config, 0) if shared else None
        try:
            with self.lock(member.path):  # one writer per run directory, as `incseg run`
                metrics = self._finished_metrics(label, config, member, table.steps(label), key)
        except IncsegError as err:
            log.info(f"[compare] {label}: FAILED: {err}")
            return failed_row(label, str(err)) | {"stores": stores(config)}
        if key is not None:
            self.first_steps.setdefault(key, member.path)
        return table.row(label, metrics) | {"stores": stores(config)}

    def _finished_metrics(
        self, label: str, config: Config, member: RunDir, steps: int, key: str | None
    ) -> dict[str, Any]:
        """The metrics of the finished run in ``member``, run (or continued) first unless it is
        finished; one whose step 0 another method has trained starts from it."""
        metrics = table_metrics(member, steps)
        if metrics is not None:
            log.info(f"[compare] {label}: finished run found in {member.path}, not re-run")
            return metrics
        log.info(f"[compare] {label}: running into {member.path}")
        source = self.first_steps.get(key)
        if source is not None and steps > 1 and not member.step_file(0).exists():
            cls = method_class(config.method.name)
            why = "plain cross-entropy" if cls.plain_first_step else "the same step 0"
            if config.method.params.get("memory_size"):
                why += "; the memory starts at step 1"
            log.info(
                f"[compare] {label}: step 0 is the one of {source.name} ({why}), not retrained"
            )
            adopt_steps(member.path, config, source, 0, self.dist)
        self.run(config, member.path)
        metrics = table_metrics(member, steps)
        if metrics is None:
            raise IncsegError(
                f"{member.path / METRICS_FILE}: the run ended without the per-class IoU of its "
                f"{steps} step(s)"
            )
        return metrics


def run_comparison(
    base: Config,
    options: ComparisonOptions,
    out: Path,
    *,
    run: Callable[[Config, Path], None],
    dist: DistInfo = SINGLE,
    lock: Callable[[Path], AbstractContextManager[None]] = _lock_alone,
) -> list[dict]:
    """Run (or reuse) every method of ``options``, then write the comparison files into ``out``.

    Under ``torchrun`` every rank runs this (each method's training is distributed); only
    rank 0 logs and writes the comparison files.

    ``out`` is locked for the whole comparison, so a second comparison into it is refused at
    once; each method's directory is locked while it is read or run, so that no ``incseg run``
    writes it meanwhile. A method whose run fails with a user-facing error (e.g. a non-finite
    loss, or its directory locked by another process) is recorded as failed, with the message,
    in ``comparison.md``; the other methods still run. Running the comparison again retries it.

    Args:
        run: ``run(config, run_dir)`` trains one configuration, continuing the finished steps
            of an interrupted run or the step 0 adopted from another method's run
            (``run_protocol(..., resume=True)`` in the CLI).
        dist: this process's identity; rank 0 logs and writes the comparison files.
        lock: ``lock(directory)`` holds a directory's lock (default: this process's,
            ``RunDir.locked``; under ``torchrun`` the CLI's, held by rank 0 for every rank).

    Raises:
        IncsegError: a method's config is invalid, a method's directory holds a run of another
            config, or ``out`` is locked by another process; nothing has run then.
    """
    table = _Table.of(base)
    jobs = options.jobs(base)
    members = _Members(out, run, lock, dist, options.share_first_step)
    with lock(out):  # one comparison per directory, for its whole length
        for label, config in jobs:
            RunDir(out / label).check_config(config, "reuse or continue")
        rows = [members.row(label, config, table) for label, config in jobs]
        if dist.is_main:  # under torchrun every rank trains; rank 0 writes
            write_outputs(rows, out, table.title, table.ranges())
            log.info((out / "comparison.md").read_text())
    return rows
