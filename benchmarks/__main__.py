"""``python -m benchmarks [NAME ...] [--json FILE]``: run benchmarks, one JSON line per figure."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from benchmarks.common import machine
from benchmarks.data_path import BENCHMARKS as DATA_BENCHMARKS
from benchmarks.incremental_query import bench_incremental_query
from benchmarks.memory import bench_memory
from benchmarks.query_step import bench_query_step
from benchmarks.train_step import bench_prediction, bench_train_step

BENCHMARKS = {
    **DATA_BENCHMARKS,
    "prediction": bench_prediction,
    "train_step": bench_train_step,
    "memory": bench_memory,
    "query_step": bench_query_step,
    "incremental_query": bench_incremental_query,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default: all of {list(BENCHMARKS)})"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("benchmarks/results.json"),
        help="JSON file of figures; figures of the same name from the same machine are replaced, "
        "others kept",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark(s) {unknown}; valid: {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    figures = {}
    try:
        previous = json.loads(args.json.read_text())
        if previous.get("machine") == machine():  # figures from another machine do not mix
            figures = {f["name"]: f for f in previous["figures"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for name in args.names or BENCHMARKS:
        for figure in BENCHMARKS[name]():
            print(figure.line(), flush=True)
            figures[figure.name] = asdict(figure)
    args.json.write_text(
        json.dumps({"machine": machine(), "figures": list(figures.values())}, indent=1)
    )
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
