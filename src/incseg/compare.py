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

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from incseg.compare_table import (
    JOINT,
    aggregate,
    comparison_row,
    failed_row,
    write_outputs,
    write_runs,
)
from incseg.config import Config, MethodConfig, apply_override, config_from_dict
from incseg.engine.adopt import adopt_steps, shared_steps_key
from incseg.engine.distributed import SINGLE, DistInfo
from incseg.engine.loaders import Sources
from incseg.engine.plan import image_passes, plan_steps
from incseg.engine.rundir import METRICS_FILE, RunDir
from incseg.errors import ConfigError, IncsegError
from incseg.methods import check_method_name, method_class
from incseg.protocol import StepInfo, step_info
from incseg.published import published_for

log = logging.getLogger(__name__)


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
    # Joint learns every class at once: the class order changes only how its table splits them
    proto = dataclasses.replace(base.protocol, setting="offline", last_step=None, order="default")
    return dataclasses.replace(
        base, name=f"{base.name}-joint", protocol=proto, train=train, method=MethodConfig(name="ft")
    )


def stores(config: Config) -> str:
    """What a method keeps of earlier steps' data besides its model, for the tables
    (:meth:`incseg.methods.base.Method.stores`): ``"nothing"``, ``"images (N)"`` or
    ``"query features (N per class)"``."""
    return config.method.build().stores()


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
        seeds: ``train.seed`` of each cell (``--seeds``); None: the config's, one cell.
        orders: ``protocol.order`` of each cell (``--orders``); None: the config's.
    """

    methods: tuple[str, ...]
    joint: bool = False
    joint_epochs: int | None = None
    method_sets: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    share_first_step: bool = True
    seeds: tuple[int, ...] | None = None
    orders: tuple[str, ...] | None = None

    def jobs(self, base: Config) -> list[tuple[str, Config]]:
        """(row label, its run's config) per row; every config validated before anything runs."""
        jobs = [(m, method_config(base, m, self.method_sets.get(m, ()))) for m in self.methods]
        if self.joint:
            jobs.append((JOINT, joint_config(base, self.joint_epochs)))
        return jobs

    def cells(self, base: Config, out: Path) -> list[Cell]:
        """Every (seed, order) combination, seeds outermost; one cell in ``out`` itself without
        ``seeds`` and ``orders``, else one directory per cell (:meth:`Cell.name`)."""
        if self.seeds is None and self.orders is None:
            return [Cell(None, None, out, base, self.jobs(base))]
        cells = []
        for seed in self.seeds or (base.train.seed,):
            for order in self.orders or (base.protocol.order,):
                config = cell_config(base, seed, order)
                cell = Cell(seed, order, out, config, self.jobs(config))
                cells.append(dataclasses.replace(cell, path=out / cell.name()))
        return cells

    def spread(self, base: Config) -> str | None:
        """What the runs of a table cell are, for the tables (None: one run)."""
        if self.seeds is None and self.orders is None:
            return None
        seeds = self.seeds or (base.train.seed,)
        orders = self.orders or (base.protocol.order,)
        return (
            f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}) x {len(orders)} class "
            f"order(s) ({', '.join(map(str, orders))})"
        )


def cell_config(base: Config, seed: int, order: str | tuple[int, ...]) -> Config:
    """``base`` with ``train.seed`` and ``protocol.order``; an order that is not one of the
    setting's is refused here, before anything runs (``protocol.order``'s error)."""
    raw = base.to_dict()
    raw["train"]["seed"] = seed
    raw["protocol"]["order"] = order if isinstance(order, str) else list(order)
    try:
        config = config_from_dict(raw)
        config.setting  # noqa: B018 - the order is checked against the setting here
    except ConfigError as err:
        raise ConfigError(f"--seeds / --orders ({seed}, {order}): {err}") from None
    return config


def parse_orders(text: str) -> tuple[str, ...]:
    """``"default,random:1,b"`` -> the orders; an explicit list is given with
    ``--set protocol.order=[...]``, not here (its commas would split it)."""
    orders = tuple(o.strip() for o in text.split(",") if o.strip())
    if not orders:
        raise ConfigError("--orders: give at least one order, e.g. default,random:1,random:2")
    for order in orders:
        if "[" in order or order.isdigit():
            raise ConfigError(
                f"--orders {text!r}: takes order names (default, b, c, random:K); give an explicit "
                "list of classes with --set protocol.order=[...] instead"
            )
    if len(set(orders)) < len(orders):
        raise ConfigError(f"--orders {text!r}: an order is listed twice")
    return orders


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> the seeds (each in ``train.seed``'s range, none twice)."""
    seeds = []
    for item in (s.strip() for s in text.split(",")):
        if not item.isdigit():
            raise ConfigError(f"--seeds {text!r}: {item!r} is not a non-negative integer")
        seeds.append(int(item))
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"--seeds {text!r}: a seed is listed twice")
    return tuple(seeds)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (seed, order) combination of a comparison: its directory (each method runs into
    ``path/<method>``), its base config and its rows' jobs."""

    seed: int | None
    order: str | tuple[int, ...] | None
    path: Path
    base: Config
    jobs: list[tuple[str, Config]]

    def name(self) -> str:
        """``seed0-default``, ``seed1-random-3``: the cell's directory name."""
        order = self.order if isinstance(self.order, str) else "list"
        return f"seed{self.seed}-{order.replace(':', '-')}"

    def tags(self) -> dict[str, Any]:
        if self.seed is None:
            return {}
        return {"seed": self.seed, "order": self.order, "cell": f"seed {self.seed}, {self.order}"}


@dataclasses.dataclass(frozen=True)
class _Table:
    """The table's columns: the base config's setting after its last step."""

    title: str
    last: int  # the last step of the incremental rows
    info: StepInfo  # of that step: its classes, and which of them are old
    complete: bool  # the last step is the setting's: published numbers compare

    @classmethod
    def of(cls, base: Config) -> _Table:
        setting = base.setting
        last = setting.num_steps - 1 if base.protocol.last_step is None else base.protocol.last_step
        title = f"{base.data.dataset} {setting.name} ({base.protocol.mode})"
        return cls(title, last, step_info(setting, last), last == setting.num_steps - 1)

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

    run: Callable[[Config, Path], None]
    lock: Callable[[Path], AbstractContextManager[None]]
    dist: DistInfo
    share_first_step: bool
    # shared_steps_key -> the directory of a finished run with that step 0
    first_steps: dict[str, Path] = dataclasses.field(default_factory=dict)

    def row(self, member: RunDir, label: str, config: Config, table: _Table) -> dict:
        """``label``'s row, run into ``member``; a failed row with the message of a user-facing
        error that stopped it (another process writing its directory, a non-finite loss...)."""
        # Equal keys train the same step 0: plain-first-step methods, and a method with and
        # without its memory (shared_steps_key); the key holds the seed and the order.
        shared = self.share_first_step and label != JOINT
        key = shared_steps_key(config, 0) if shared else None
        extra = {"stores": stores(config), "published": published_for(config)}
        extra["complete"] = table.complete or label == JOINT
        try:
            with self.lock(member.path):  # one writer per run directory, as `incseg run`
                metrics = self._finished_metrics(label, config, member, table.steps(label), key)
        except IncsegError as err:
            log.info(f"[compare] {label}: FAILED: {err}")
            return failed_row(label, str(err)) | extra
        if key is not None:
            self.first_steps.setdefault(key, member.path)
        return table.row(label, metrics) | extra

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
    """Run (or reuse) every method of ``options`` in every cell (seed and class order), then
    write the comparison files into ``out``; returns the table's rows (:func:`aggregate`).

    Under ``torchrun`` every rank runs this (each method's training is distributed); only
    rank 0 logs and writes the comparison files.

    ``out`` is locked for the whole comparison, so a second comparison into it is refused at
    once; each method's directory is locked while it is read or run, so that no ``incseg run``
    writes it meanwhile. A method whose run fails with a user-facing error (e.g. a non-finite
    loss, or its directory locked by another process) is recorded as failed, with the message,
    in ``comparison.md``; the other methods still run. Running the comparison again retries it
    and continues an interrupted one: finished runs are read, not re-run.

    With several cells each cell's directory gets its own ``comparison.*`` of its runs, and
    ``out`` the table over cells (mean ± standard deviation, runs counted) and ``runs.csv``.

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
    cells = options.cells(base, out)
    members = _Members(run, lock, dist, options.share_first_step)
    table = _Table.of(base)
    with lock(out):  # one comparison per directory, for its whole length
        for cell in cells:
            for label, config in cell.jobs:
                RunDir(cell.path / label).check_config(config, "reuse or continue")
        runs = [_cell_rows(cell, members) for cell in cells]
        rows = aggregate(runs)
        if dist.is_main:  # under torchrun every rank trains; rank 0 writes
            spread = options.spread(base)
            if spread is not None:
                for cell, cell_rows in zip(cells, runs, strict=True):
                    title = f"{table.title}, {cell.tags()['cell']}"
                    write_outputs(aggregate([cell_rows]), cell.path, title, table.ranges())
                write_runs(runs, out / "runs.csv")
            write_outputs(rows, out, table.title, table.ranges(), spread)
            log.info((out / "comparison.md").read_text())
    return rows


def _cell_rows(cell: Cell, members: _Members) -> list[dict]:
    table = _Table.of(cell.base)
    rows = []
    for label, config in cell.jobs:
        row = members.row(RunDir(cell.path / label), label, config, table)
        rows.append(row | cell.tags())
    return rows


@dataclasses.dataclass
class _Planner:
    """The plan of one comparison's runs: what each would do and the image passes it makes."""

    share_first_step: bool
    progress: bool
    sources: Sources | None = None  # loaded once for every run that reads the same data
    first_steps: set[str] = dataclasses.field(default_factory=set)
    totals: list[int] = dataclasses.field(default_factory=lambda: [0, 0, 0, 0])

    def line(self, cell: Cell, label: str, config: Config, table: _Table) -> str:
        """The plan's line of ``label`` in ``cell``: its status, then its image passes."""
        member, steps = RunDir(cell.path / label), table.steps(label)
        key = shared_steps_key(config, 0) if self.share_first_step and label != JOINT else None
        status, passes = "finished: read, not re-run", (0, 0, 0)
        if table_metrics(member, steps) is None:
            done = member.step_files()
            first = next(k for k in range(steps + 1) if k not in done)
            status = f"continues at step {first}" if first else "runs every step"
            if first == 0 and key in self.first_steps and steps > 1:
                first, status = 1, "step 0 from an earlier row, runs steps 1.."
            plans = plan_steps(config, self._data(config), first)
            passes = image_passes(plans, config.method.build())
            problems = [p.step for p in plans if p.problem is not None]
            if problems:
                status += f"; steps {problems} cannot train"
            self.totals[0] += 1
        if key is not None:
            self.first_steps.add(key)
        for index, value in enumerate(passes, start=1):
            self.totals[index] += value
        where = cell.tags().get("cell", "")
        return f"  {where:<24} {label:<14} {status:<44} " + " ".join(f"{v:>12,}" for v in passes)

    def _data(self, config: Config) -> Sources:
        if self.sources is None or self.sources.config.data != config.data:
            self.sources = Sources.load(config, progress=self.progress)
        return self.sources.for_config(config)


def plan_comparison(
    base: Config, options: ComparisonOptions, out: Path, *, progress: bool = False
) -> str:
    """What ``incseg compare --dry-run`` prints: for every cell (seed, order) and row, whether
    its run is finished (read, not re-run), continues an interrupted one, or starts from an
    earlier row's step 0, and the image passes it makes (:func:`incseg.engine.plan.image_passes`);
    then how many runs and image passes the comparison makes in all. Nothing is trained or
    written."""
    cells = options.cells(base, out)
    planner = _Planner(options.share_first_step, progress)
    rows = len(cells[0].jobs)
    heads = ("student f+b", "old model", "evaluation")
    lines = [
        f"Plan of the comparison into {out}: {len(cells)} cell(s) x {rows} row(s)",
        f"  {'cell':<24} {'method':<14} {'status':<44} " + " ".join(f"{h:>12}" for h in heads),
    ]
    for cell in cells:
        table = _Table.of(cell.base)
        lines += [planner.line(cell, label, config, table) for label, config in cell.jobs]
    runs, student, old, evaluated = planner.totals
    lines.append(
        f"{runs} of {len(cells) * rows} runs to make; image passes: {student:,} student "
        f"forward+backward, {old:,} old-model forward, {evaluated:,} evaluation forward"
    )
    return "\n".join(lines)
