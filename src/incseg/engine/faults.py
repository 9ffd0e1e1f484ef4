"""Fault injection for the resume tests: ``INCSEG_KILL_AT=POINT`` makes the process SIGKILL
itself when it reaches ``POINT``.

Points: ``epoch:STEP:EPOCHS_DONE`` (just after that epoch checkpoint), ``step:STEP`` (after the
step's checkpoint and metrics), ``iteration:STEP:EPOCH:ITER`` (mid-epoch, EPOCH 0-based),
``scan:STEP:BATCH`` (before batch BATCH, 0-based, of the pass before a step,
``Method.scans_old_model``) and
``write:NAME`` (inside the atomic write of file NAME, after the data is on disk and before the
rename). Unset, every call is one string comparison.
"""

from __future__ import annotations

import os
import signal

_TARGET = os.environ.get("INCSEG_KILL_AT")


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL if ``INCSEG_KILL_AT`` names ``name``."""
    if _TARGET is not None and name == _TARGET:
        os.kill(os.getpid(), signal.SIGKILL)
