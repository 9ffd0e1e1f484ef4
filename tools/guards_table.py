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
    print("Every row is a test (`tests/test_guards.py`); this file is written by "
          "`python tools/guards_table.py > docs/guards.md`. All exit with code 2, one `error:` line,")
    print("no traceback. Long valid-choice lists are cut here with `...`.\n")
    print("| bad input | message |")
    print("|---|---|")
    for what, argv, _ in CASES:
        code, text = run(argv)
        if len(text) > 260:
            text = text[:257] + "..."
        print(f"| {what} | `{text.replace('|', '/')}` (exit {code}) |")
    print("| a non-finite loss (EWC, weight 1e30) | `error: non-finite loss at step 1, epoch 2, iteration 1: "
          "loss=nan (ce=nan, penalty=inf)` (exit 2; step_0.pt kept) |")


if __name__ == "__main__":
    main_table()
