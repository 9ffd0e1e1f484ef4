"""Timing helpers: every figure is a median over repeats, printed as one machine-readable line."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Figure:
    name: str
    median: float
    unit: str
    work: str  # what one measurement covers, e.g. "1000 labels"

    def line(self) -> str:
        return json.dumps(asdict(self))


def median_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def run_in_process(module: str, *args: str) -> dict:
    """``python -m MODULE ARGS`` in a process of its own (its peak memory is its own); returns
    the JSON object of its last output line.

    Raises:
        RuntimeError: the process failed; the message holds the end of its stderr.
    """
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
