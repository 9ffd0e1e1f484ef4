"""Published numbers beside incseg's results: which built-in config a run reproduces, the number
its paper, README or model zoo publishes, in which of incseg's columns it is to be read, and how
far the run is from it.

A published number belongs to a *row of a table*: a dataset, a setting, a mode, a class order
and a method (with or without its exemplar memory). A run matches the built-in config of the same
row (:func:`published_for`); where the run's config differs from that built-in config in anything
else (the backbone, the epochs, the crop...), the differences are listed beside the number, so a
demo-scale run is never read as a reproduction. The number is compared in its own grouping only
(:data:`COLUMNS`): a number over every class with background against ``with_bg``, the MiB paper's
"all" (background excluded) against ``all``, an old-class number against ``old``; a run that does
not end at the setting's last step has no column to compare with, and says so.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cache

from incseg.config import Config, builtin_configs, config_diff, load_config
from incseg.configs import PUBLISHED, SEED_MIOU, ZOO_MIOU
from incseg.metrics import StepReport

# A published number's grouping -> what incseg's column of it averages.
COLUMNS = {
    "all": "all seen classes, background excluded (the MiB paper's all)",
    "with_bg": "every class with background",
    "old": "step 0's classes, background excluded",
}
# Keys that do not change what a run measures, left out of the differences.
_IGNORED = ("name", "data.root", "data.saliency", "train.workers")


@dataclasses.dataclass(frozen=True)
class Published:
    """A published mIoU of a built-in config.

    Attributes:
        config: the built-in config it belongs to (``voc/15-5-overlap-ssul``).
        miou: the number, in %.
        source: where it is published and what it averages (``"SSUL README, with background"``).
        column: incseg's column it is read against: a key of :data:`COLUMNS`.
    """

    config: str
    miou: float
    source: str
    column: str


def published_numbers() -> dict[str, Published]:
    """Every built-in config's published number: ``configs.PUBLISHED``, the seed table's rows and
    cssegmentation's zoo rows (both over every class with background)."""
    numbers = {name: Published(name, *entry) for name, entry in PUBLISHED.items()}
    for row, miou in (SEED_MIOU | ZOO_MIOU).items():
        if miou is not None:
            source = "seed table" if SEED_MIOU.get(row) is not None else "cssegmentation's zoo"
            numbers[f"seed/{row}"] = Published(
                f"seed/{row}", miou, f"{source}, with background", "with_bg"
            )
    return numbers


def _row(config: Config) -> tuple:
    """What a published number is a number of: dataset, setting, mode, order, method, memory."""
    order = config.protocol.order
    return (
        config.data.dataset,
        config.protocol.setting,
        config.protocol.mode,
        order if isinstance(order, str) else tuple(order),
        config.method.name,
        bool(config.method.params.get("memory_size", 0)),
    )


@cache
def _builtin(name: str) -> tuple[tuple, dict]:
    config = load_config(name)
    return _row(config), config.to_dict()


def _differences(builtin: dict, mine: dict) -> list[str]:
    keep = []
    for line in config_diff(builtin, mine):
        key = line.partition(":")[0]
        if not any(key == k or key.startswith(f"{k}.") for k in _IGNORED):
            keep.append(line)
    return keep


@dataclasses.dataclass(frozen=True)
class Match:
    """A run's published number: the number, and the keys in which the run's config differs
    from its built-in config (``key: built-in -> run``; empty: the built-in config itself)."""

    published: Published
    differences: tuple[str, ...]


def published_for(config: Config) -> Match | None:
    """The published number of the table row ``config`` runs (module docstring); among several
    built-in configs of that row, the one it differs from least. None where no built-in config
    of the row carries a number."""
    row, mine = _row(config), config.to_dict()
    best: Match | None = None
    available = set(builtin_configs(with_folders=True))
    for name, number in published_numbers().items():
        # every built-in config's name says its dataset (voc/..., seed/..._vocaug..., ade/...)
        if name not in available or config.data.dataset not in name:
            continue
        builtin_row, builtin = _builtin(name)
        if builtin_row != row:
            continue
        match = Match(number, tuple(_differences(builtin, mine)))
        if best is None or len(match.differences) < len(best.differences):
            best = match
    return best


def comparable(match: Match, ends_at_last_step: bool) -> str | None:
    """Why the run's number cannot be set against the published one (None: it can): published
    numbers are after a setting's last step."""
    if not ends_at_last_step:
        return "the published number is after the setting's last step; this run stops earlier"
    return None


def published_cell(match: Match | None, result: float | None, why_not: str | None = None) -> str:
    """``"71.2 (w/ bg; SSUL README, with background), run -3.4"``: the number, its grouping and
    source, and the run's difference in that grouping (``result`` in [0, 1], None when the run
    has no number); ``"-"`` without a published number."""
    if match is None:
        return "-"
    p = match.published
    text = f"{p.miou:.1f} ({_short(p.column)}; {p.source})"
    if why_not is not None:
        return f"{text}; not comparable: {why_not}"
    if result is None or math.isnan(result):
        return text
    return f"{text}, run {100 * result - p.miou:+.1f}"


def _short(column: str) -> str:
    return {"with_bg": "w/ bg"}.get(column, column)


def report_columns(report: StepReport) -> dict[str, float]:
    """A step report's mIoU in each grouping of :data:`COLUMNS`, in [0, 1]."""
    return {"all": report.miou_all, "with_bg": report.miou_with_bg, "old": report.miou_old}


def summary_lines(config: Config, last: StepReport, num_steps: int) -> list[str]:
    """Markdown lines of ``summary.md``'s "Published number" section for a run of ``config``
    whose last report is ``last``, of a setting of ``num_steps`` steps; none where no built-in
    config of the row carries a number."""
    match = published_for(config)
    if match is None:
        return []
    p = match.published
    lines = ["## Published number", ""]
    why_not = comparable(match, last.step == num_steps - 1)
    if why_not is None:
        mine = report_columns(last)[p.column]
        lines.append(
            f"`{p.config}`: {p.miou:.2f}% ({p.source}), read against this run's "
            f"{_short(p.column)} ({COLUMNS[p.column]}): {100 * mine:.2f}%, difference "
            f"{100 * mine - p.miou:+.2f}."
        )
    else:
        lines.append(f"`{p.config}`: {p.miou:.2f}% ({p.source}); not comparable: {why_not}.")
    if match.differences:
        lines += [
            "",
            f"This run's config differs from `{p.config}` in (built-in -> this run):",
            "",
            *(f"- {d}" for d in match.differences),
        ]
    else:
        lines += ["", f"This run's config is `{p.config}`'s."]
    return [*lines, ""]
