"""The exemplar memory's selection at paper scale: ``select_balanced`` choosing SSUL-M / DKD-M's 100
images (and STAR-M's 50, ADE20K's 300) from a VOC-sized pool of candidates (10,582 images with
1-3 of 15 old classes each), CPU. The candidates' classes come from a pass over the previous
step's images, which costs one evaluation pass of those images (``train_step eval``)."""

from __future__ import annotations

import numpy as np

from incseg.protocol.memory import Exemplar, select_balanced


def bench_memory() -> list:
    from benchmarks.common import Figure, median_time

    gen = np.random.default_rng(0)
    pool = [
        Exemplar(i, f"img{i}", 0, tuple(sorted(set(gen.integers(1, 16, gen.integers(1, 4))))))
        for i in range(10582)
    ]
    figures = []
    for size in (50, 100, 300):
        seconds = median_time(
            lambda s=size: select_balanced(pool, list(range(1, 16)), s, np.random.default_rng(1)),
            repeats=5,
        )
        work = f"{len(pool)} candidates, 15 old classes, memory {size}"
        figures.append(Figure(f"memory_selection_{size}", seconds * 1e3, "ms", work))
    return figures
