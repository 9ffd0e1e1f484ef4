"""Write docs/guards.md: run every bad-input case of tests/test_guards.py and record its message.

python tools/guards_table.py > docs/guards.md
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_guards import CASES

from incseg.cli import main
from incseg.config import RANGES
from incseg.methods import METHODS
from incseg.ranges import ranges_of


def run(argv_factory) -> tuple[int, str]:
    """Exit code and last stderr line of one case (set-up output discarded)."""
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args = argv_factory(Path(tmp))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args)
        text = err.getvalue().strip().splitlines()[-1].replace(tmp, "<tmp>")
    return code, text


def main_table() -> None:
    print("# Bad inputs and the errors they get\n")
    print(
        "Every row is a test (`tests/test_guards.py`); this file is written by "
        "`python tools/guards_table.py > docs/guards.md`. All exit with code 2, one `error:` line,"
    )
    print("no traceback. Long valid-choice lists are cut here with `...`.\n")
    print("| bad input | message |")
    print("|---|---|")
    for what, argv, _ in CASES:
        code, text = run(argv)
        if len(text) > 260:
            text = text[:257] + "..."
        print(f"| {what} | `{text.replace('|', '/')}` (exit {code}) |")
    print(
        "| a non-finite loss (EWC, weight 1e6, LR 1) | `error: non-finite loss at step 1, epoch 3, iteration 1: "
        "loss=nan (ce=nan, penalty=inf)` (exit 2; step_0.pt kept) |"
    )
    print("\n## Valid ranges of numeric keys\n")
    print(
        "Checked when the config is built (declared next to each field with `incseg.ranges.ranged`);"
    )
    print("`protocol.last_step` must be a step of the setting and `model.output_stride` 8 or 16.")
    print("`tests/test_ranges.py` sets every numeric key to 0, -1 and 10^15.\n")
    print("| key | valid | why |")
    print("|---|---|---|")
    for key, valid in RANGES.items():
        print(f"| `{key}` | {valid.describe()} | {valid.why} |")
    rows: dict[tuple[str, str, str], list[str]] = {}
    for name, cls in sorted(METHODS.items()):
        for key, valid in ranges_of(cls).items():
            rows.setdefault((key, valid.describe(), valid.why), []).append(name)
    for (key, described, why), names in rows.items():
        print(f"| `method.{key}` ({', '.join(names)}) | {described} | {why} |")


if __name__ == "__main__":
    main_table()
