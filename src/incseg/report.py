"""Text and Markdown tables of step reports (class names, never channel numbers)."""

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
    for k, (name, iou, present) in enumerate(zip(report.class_names, report.iou, report.present, strict=True)):
        group = "old" if k < report.num_base_channels else "new"
        lines.append(f"  {name:<{width}} {_pct(iou if present else math.nan)}  {group}")
    lines.append(
        f"  mIoU  old ({report.old_range}) {_pct(report.miou_old)} | "
        f"new ({report.new_range}) {_pct(report.miou_new)} | all {_pct(report.miou_all)}"
    )
    return "\n".join(lines)


def _averages(reports: Sequence[StepReport]) -> tuple[float, float, float]:
    def avg(values: list[float]) -> float:
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    return (
        avg([r.miou_old for r in reports]),
        avg([r.miou_new for r in reports]),
        avg([r.miou_all for r in reports]),
    )


def summary_rows(reports: Sequence[StepReport]) -> list[tuple[str, str, str, str]]:
    rows = [(str(r.step), _pct(r.miou_old), _pct(r.miou_new), _pct(r.miou_all)) for r in reports]
    rows.append(("avg", *(_pct(v) for v in _averages(reports))))
    return rows


def format_summary(reports: Sequence[StepReport]) -> str:
    """mIoU per step (old / new / all) and the average over steps, as text."""
    last = reports[-1]
    header = f"  {'step':<5} {'old ' + last.old_range:>10} {'new':>6} {'all':>6}"
    lines = ["Summary (mIoU %, old = step-0 classes incl. background)", header]
    lines += [f"  {s:<5} {o:>10} {n:>6} {a:>6}" for s, o, n, a in summary_rows(reports)]
    return "\n".join(lines)


def summary_markdown(reports: Sequence[StepReport], heading: str, config_yaml: str) -> str:
    """``summary.md`` of a run: summary table, last step's per-class IoU, resolved config."""
    last = reports[-1]
    out = [f"# {heading}", "", "## mIoU per step (%)", "",
           f"| step | old ({last.old_range}) | new | all |", "|---|---|---|---|"]  # fmt: skip
    out += [f"| {s} | {o.strip()} | {n.strip()} | {a.strip()} |" for s, o, n, a in summary_rows(reports)]
    out += ["", f"## IoU per class after step {last.step} (%)", "", "| class | group | IoU |",
            "|---|---|---|"]  # fmt: skip
    for k, (name, iou, present) in enumerate(zip(last.class_names, last.iou, last.present, strict=True)):
        group = "old" if k < last.num_base_channels else "new"
        out.append(f"| {name} | {group} | {_pct(iou if present else math.nan).strip()} |")
    out += ["", "## Resolved config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(out)
