"""Text and Markdown tables of step reports (class names, never channel numbers).

Old / new / all follow the MiB paper (background excluded); "w/ bg" is the mean over every class
with background, the seed table's mIoU (see :mod:`incseg.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from incseg.metrics import StepReport


def _pct(value: float) -> str:
    return "  -  " if value is None or math.isnan(value) else f"{100 * value:5.1f}"


def format_step_table(report: StepReport, title: str) -> str:
    """Per-class IoU of one step, then old / new / all mIoU."""
    width = max(12, *(len(n) for n in report.class_names)) + 2
    lines = [title, f"  {'class':<{width}} {'IoU':>5}  group"]
    for k, (name, iou, present) in enumerate(
        zip(report.class_names, report.iou, report.present, strict=True)
    ):
        lines.append(f"  {name:<{width}} {_pct(iou if present else math.nan)}  {_group(k, report)}")
    lines.append(
        f"  mIoU  old ({report.old_range}) {_pct(report.miou_old)} | "
        f"new ({report.new_range}) {_pct(report.miou_new)} | all ({report.all_range}) "
        f"{_pct(report.miou_all)} | w/ bg ({report.with_bg_range}) {_pct(report.miou_with_bg)}"
    )
    if report.abstained is not None:
        lines.append(
            f"  no prediction on {100 * report.abstained:.2f}% of the labelled pixels "
            "(left out of the IoU, as SimCIS's evaluator leaves them out)"
        )
    return "\n".join(lines)


def _group(channel: int, report: StepReport) -> str:
    if channel == 0:
        return "background"
    return "old" if channel < report.num_base_channels else "new"


KEYS = ("miou_old", "miou_new", "miou_all", "miou_with_bg")


def _averages(reports: Sequence[StepReport]) -> list[float]:
    def avg(values: list[float]) -> float:
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    return [avg([getattr(r, key) for r in reports]) for key in KEYS]


def summary_rows(reports: Sequence[StepReport]) -> list[tuple[str, ...]]:
    """Per step, then ``avg`` over steps: step, old, new, all (paper grouping), w/ bg."""
    rows = [(str(r.step), *(_pct(getattr(r, key)) for key in KEYS)) for r in reports]
    rows.append(("avg", *(_pct(v) for v in _averages(reports))))
    return rows


def _headers(last: StepReport) -> list[str]:
    return [
        f"old {last.old_range}",
        f"new {last.new_range}",
        f"all {last.all_range}",
        f"w/ bg {last.with_bg_range}",
    ]


def format_summary(reports: Sequence[StepReport]) -> str:
    """mIoU per step (old / new / all, then with background) and the average over steps."""
    heads = _headers(reports[-1])
    widths = [max(6, len(h)) for h in heads]
    lines = [
        (
            "Summary (mIoU %; old / new / all as the MiB paper, background excluded; "
            "w/ bg: every class, background included)"
        ),
        "  step  " + " ".join(f"{h:>{w}}" for h, w in zip(heads, widths, strict=True)),
    ]
    for step, *values in summary_rows(reports):
        lines.append(
            f"  {step:<5} " + " ".join(f"{v:>{w}}" for v, w in zip(values, widths, strict=True))
        )
    return "\n".join(lines)


def summary_markdown(
    reports: Sequence[StepReport], heading: str, config_yaml: str, published: Sequence[str] = ()
) -> str:
    """``summary.md`` of a run: summary table, the ``published`` section's Markdown lines
    (:func:`incseg.published.summary_lines`), last step's per-class IoU, resolved config."""
    last = reports[-1]
    out = [
        f"# {heading}",
        "",
        "## mIoU per step (%)",
        "",
        (
            "Old / new / all as the MiB paper groups them (background excluded); w/ bg: the mean over "
            "every class with background (cssegmentation's and PLOP's mIoU)."
        ),
        "",
        "| step | " + " | ".join(_headers(last)) + " |",
        "|---|---|---|---|---|",
    ]
    out += ["| " + " | ".join(v.strip() for v in row) + " |" for row in summary_rows(reports)]
    out += ["", *published]
    out += [
        f"## IoU per class after step {last.step} (%)",
        "",
        "| class | group | IoU |",
        "|---|---|---|",
    ]
    for k, (name, iou, present) in enumerate(
        zip(last.class_names, last.iou, last.present, strict=True)
    ):
        out.append(f"| {name} | {_group(k, last)} | {_pct(iou if present else math.nan).strip()} |")
    out += ["", "## Resolved config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(out)
