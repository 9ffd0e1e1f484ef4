"""``incseg compare``'s tables: each run's row, the rows of one method over seeds and class orders
brought together (mean, standard deviation, number of runs), and the files (``comparison.md``,
``.csv``, ``.png``, ``runs.csv``).

A run's row (:func:`comparison_row`) holds mIoU in [0, 1] after the last step, grouped by class
name; a method's row (:func:`aggregate`) holds the mean over its finished runs of each column
and the sample standard deviation (``n - 1`` in the denominator; none with a single run), so a
reader sees how far seed and class-order noise move each number. Old / new are step 0's classes
and the later ones *of each run's order*: over several orders they are different classes of the
same sizes, as in SimCIS's evaluation over random orders (Zhu et al., CVPR 2025, Section 4).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from incseg.published import Match, published_cell

JOINT = "joint"
COLUMNS = ("old", "new", "all", "with_bg", "avg")


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
    row = {k: nan for k in COLUMNS}
    return {"method": label, **row, "old_per_step": [], "all_per_step": [], "failed": reason}


def _spread(values: list[float]) -> tuple[float, float]:
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else math.nan


def _per_step(lists: list[list[float]]) -> tuple[list[float], list[float]]:
    steps = max((len(v) for v in lists), default=0)
    pairs = [_spread([v[s] for v in lists if s < len(v)]) for s in range(steps)]
    return [m for m, _ in pairs], [d for _, d in pairs]


def aggregate(runs: Sequence[Sequence[dict]]) -> list[dict]:
    """One row per method (in the order of the first cell) from every cell's rows: per column
    ``mean`` (key as in a run's row) and ``KEY_std``; ``n`` finished runs of ``planned``;
    ``failed``: the failed runs' reasons, tagged with their cell; ``published``: the run rows'
    :class:`~incseg.published.Match` where every run of the method has the same one."""
    labels = list(dict.fromkeys(r["method"] for cell in runs for r in cell))
    rows = []
    for label in labels:
        mine = [r for cell in runs for r in cell if r["method"] == label]
        done = [r for r in mine if not r.get("failed")]
        row: dict = {"method": label, "n": len(done), "planned": len(mine)}
        for key in COLUMNS:
            row[key], row[f"{key}_std"] = _spread([r[key] for r in done])
        for key in ("old_per_step", "all_per_step"):
            row[key], row[f"{key}_std"] = _per_step([r[key] for r in done])
        failures = [
            f"{r['cell']}: {r['failed']}" if r.get("cell") else r["failed"]
            for r in mine
            if r.get("failed")
        ]
        if failures:
            row["failed"] = "; ".join(failures)
        row["stores"] = mine[0].get("stores", "")
        matches = {_match_key(r.get("published")) for r in mine}
        row["published"] = mine[0].get("published") if len(matches) == 1 else None
        row["complete"] = all(r.get("complete", True) for r in mine)
        rows.append(row)
    return rows


def _match_key(match: Match | None) -> tuple | None:
    return None if match is None else (match.published.config, match.differences)


def _cell(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f}" if math.isnan(std) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _published(row: dict) -> str:
    match = row.get("published")
    if match is None:
        return "-"
    why_not = None if row.get("complete", True) else "the run stops before the last step"
    mean = row.get(match.published.column) if row.get("n", 1) else None
    return published_cell(match, mean, why_not)


def markdown(rows: list[dict], title: str, ranges: dict[str, str], spread: str | None) -> str:
    """``comparison.md``; ``spread`` says what the runs of a cell are (None: one run each)."""
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
        "images (replay) besides its model; published: the number its paper, README or zoo "
        "gives for this row, its grouping and source, and this table's difference in that "
        "grouping."
    )
    if spread is not None:
        note += (
            f" Runs: {spread}; each cell is the mean ± the sample standard deviation over the "
            "finished runs (n: finished of planned)."
        )
    lines = [
        f"# {title}",
        "",
        note,
        "",
        f"| method | stores | {' | '.join(heads)} | n | published |",
    ]
    lines.append("|---" * (len(heads) + 4) + "|")
    for r in rows:
        cells = [_cell(r[k], r.get(f"{k}_std", math.nan)) for k in COLUMNS]
        runs = f"{r.get('n', 1)}/{r.get('planned', 1)}"
        lines.append(
            f"| {r['method']} | {r.get('stores', '')} | {' | '.join(cells)} | {runs} | "
            f"{_published(r)} |"
        )
    lines += _footnotes(rows)
    return "\n".join(lines) + "\n"


def _footnotes(rows: list[dict]) -> list[str]:
    lines = []
    differing = [r for r in rows if r.get("published") and r["published"].differences]
    if differing:
        lines += ["", "Where these runs differ from the config of the published number:", ""]
        for r in differing:
            match = r["published"]
            lines.append(
                f"- {r['method']} (`{match.published.config}` -> this run): "
                + "; ".join(match.differences)
            )
    failures = [r for r in rows if r.get("failed")]
    if failures:
        lines += ["", "Failed runs (no numbers):", ""]
        lines += [f"- {r['method']}: {r['failed']}" for r in failures]
    return lines


def write_outputs(
    rows: list[dict],
    out: Path,
    title: str,
    ranges: dict[str, str],
    spread: str | None = None,
) -> None:
    """comparison.md / .csv / .png from :func:`aggregate` rows; ``ranges`` names the classes of
    ``old``, ``new``, ``all`` and ``with_bg`` (e.g. ``"1-15"``); ``spread``: what a cell's runs
    are (None: one run per cell)."""
    (out / "comparison.md").write_text(markdown(rows, title, ranges, spread))
    names = [
        f"old_{ranges['old']}",
        f"new_{ranges['new']}",
        f"all_{ranges['all']}",
        f"with_bg_{ranges['with_bg']}",
        "avg_over_steps",
    ]
    with (out / "comparison.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["method", *names, *(f"{n}_std" for n in names), "runs", "planned", "stores"]
            + ["published", "published_column", "published_source", "published_config"]
        )
        for r in rows:
            match = r.get("published")
            p = match.published if match is not None else None
            writer.writerow(
                [r["method"]]
                + [_number(r[k]) for k in COLUMNS]
                + [_number(r.get(f"{k}_std", math.nan)) for k in COLUMNS]
                + [r.get("n", 1), r.get("planned", 1), r.get("stores", "")]
                + ([p.miou, p.column, p.source, p.config] if p else ["", "", "", ""])
            )
    _plot(rows, out / "comparison.png", title, ranges)


def _number(value: float, digits: int = 2) -> str:
    return "" if math.isnan(value) else f"{100 * value:.{digits}f}"


def write_runs(runs: Sequence[Sequence[dict]], path: Path) -> None:
    """``runs.csv``: every run's own numbers, one line per run, tagged with its seed and order."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seed", "order", "method", *COLUMNS, "failed"])
        for cell in runs:
            for r in cell:
                numbers = [_number(r[k], 4) for k in COLUMNS]  # the spread's inputs, unrounded
                writer.writerow(
                    [r.get("seed", ""), r.get("order", ""), r["method"], *numbers]
                    + [r.get("failed", "")]
                )


def _plot(rows: list[dict], path: Path, title: str, ranges: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    # Twenty distinct colours, then the markers change, so that many methods stay apart.
    colours = plt.get_cmap("tab20").colors
    markers = "osD^v"
    for index, r in enumerate(rows):
        keys = ("all", "old")
        if r["method"] == JOINT:  # one step: its final numbers are the upper bound at every step
            for ax, key in zip(axes, keys, strict=True):
                ax.axhline(100 * r[key], linestyle="--", color="black", alpha=0.6, label="joint")
            continue
        colour = colours[index % len(colours)]
        style = {
            "label": r["method"],
            "color": colour,
            "marker": markers[index // len(colours) % len(markers)],
        }
        for ax, key in zip(axes, keys, strict=True):
            mean = [100 * v for v in r[f"{key}_per_step"]]
            ax.plot(range(len(mean)), mean, **style)
            std = [100 * v for v in r.get(f"{key}_per_step_std", [])]
            if any(not math.isnan(v) for v in std):  # the spread over seeds and orders
                low = [m - s for m, s in zip(mean, std, strict=True)]
                high = [m + s for m, s in zip(mean, std, strict=True)]
                ax.fill_between(range(len(mean)), low, high, color=colour, alpha=0.15)
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
