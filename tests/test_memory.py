"""The exemplar memory: the class-balanced selection against a literal re-statement of the official
loop and by hand, the stop where the official loop never ends, and the batches that mix memory
images into half of every batch (SSUL) or into the step's images (DKD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from incseg.engine.distributed import EpochBatchSampler, HalfMemorySampler
from incseg.errors import DataError
from incseg.protocol.memory import Exemplar, memory_summary, select_balanced


def candidates(class_lists):
    return [Exemplar(i, f"img{i}", 0, tuple(c)) for i, c in enumerate(class_lists)]


def official_loop(pool, classes, size, rng):
    """clovaai/SSUL utils/memory.py:103-124 restated (np.random -> the same Generator)."""
    pool = list(pool)
    rng.shuffle(pool)
    order = list(classes)
    rng.shuffle(order)
    taken, num = [], 0
    while size > num:
        for cls in order:
            for idx, mem in enumerate(pool):
                if cls in mem.classes:
                    taken.append((mem.index, cls))
                    num += 1
                    del pool[idx]
                    break
            if size <= num:
                break
    # Saved grouped by class in ascending order (memory.py:129): the next step's candidates.
    return [pair for cls in sorted(classes) for pair in taken if pair[1] == cls]


def test_selection_equals_the_official_loop():
    gen = np.random.default_rng(3)
    lists = [tuple(sorted(set(gen.integers(1, 8, size=gen.integers(1, 4))))) for _ in range(60)]
    pool = candidates(lists)
    ours = select_balanced(pool, list(range(1, 8)), 25, np.random.default_rng(11))
    ref = official_loop(pool, list(range(1, 8)), 25, np.random.default_rng(11))
    assert [(e.index, e.chosen_for) for e in ours] == ref


def test_selection_by_hand_takes_turns():
    # Two classes, three images each: four images give two per class, each image once.
    pool = candidates([(1,), (1,), (1,), (2,), (2,), (2,)])
    chosen = select_balanced(pool, [1, 2], 4, np.random.default_rng(0))
    assert sorted(e.chosen_for for e in chosen) == [1, 1, 2, 2]
    assert len({e.index for e in chosen}) == 4
    assert all(e.chosen_for in e.classes for e in chosen)
    # The same seed chooses the same images.
    again = select_balanced(pool, [1, 2], 4, np.random.default_rng(0))
    assert chosen == again


def test_a_class_without_candidates_is_skipped_and_too_few_stops():
    pool = candidates([(1,), (1,), (1,), ()])
    assert len(select_balanced(pool, [1, 2], 3, np.random.default_rng(0))) == 3
    with pytest.raises(DataError, match="only 3 of the candidate images hold an old class"):
        select_balanced(pool, [1, 2], 4, np.random.default_rng(0))


def test_summary_counts_each_class_turn():
    chosen = [
        Exemplar(0, "a", 0, (1, 2), 1),
        Exemplar(1, "b", 0, (2,), 2),
        Exemplar(2, "c", 0, (1,), 1),
    ]
    assert memory_summary(chosen, {1: "cat", 2: "dog"}) == "3 images: cat 2, dog 1"


def test_half_of_every_batch_comes_from_the_memory():
    n, memory, batch = 40, 3, 8
    sampler = HalfMemorySampler(n, memory, batch, seed=5)
    plain = EpochBatchSampler(n, batch, seed=5)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        plain.set_epoch(epoch)
        mixed, base = list(sampler), list(plain)
        assert len(mixed) == len(base) == n // batch
        for ours, theirs in zip(mixed, base, strict=True):
            from_memory = [k for k in ours if k[0] >= n]
            assert len(from_memory) == batch // 2
            assert all(n <= k[0] < n + memory for k in from_memory)
            # The other places keep the training batch as it was.
            kept = [i for i, k in enumerate(ours) if k[0] < n]
            assert [ours[i] for i in kept] == [theirs[i] for i in kept]
        assert mixed == list(sampler)  # a function of (seed, epoch)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_ranks_split_the_mixed_global_batch():
    whole = list(HalfMemorySampler(32, 5, 8, seed=2))
    parts = [list(HalfMemorySampler(32, 5, 8, seed=2, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*parts, strict=True)] == whole


def test_an_empty_memory_mixes_nothing():
    assert list(HalfMemorySampler(16, 0, 4, seed=1)) == list(EpochBatchSampler(16, 4, seed=1))


def test_memory_keys_reach_the_memory_images():
    from incseg.data.datasets import WithMemory

    class Items(torch.utils.data.Dataset):
        def __init__(self, tag, n):
            self.tag, self.n = tag, n

        def __len__(self):
            return self.n

        def __getitem__(self, key):
            return self.tag, key

    both = WithMemory(Items("train", 3), Items("memory", 2))
    assert len(both) == 5
    assert both[(1, 7)] == ("train", (1, 7)) and both[(4, 9)] == ("memory", (1, 9))


@pytest.mark.parametrize("name", ["ssul", "dkd", "star"])
def test_each_method_runs_without_a_memory(name, tiny_config_path, tmp_path):
    import json

    from helpers.method_runs import run_method

    labels = "ssul" if name == "ssul" else "plop"
    out = tmp_path / "run"
    sets = (f"method.name={name}", f"model.architecture={name}", f"protocol.labels={labels}")
    run_method(tiny_config_path, out, *sets)
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert len(steps) == 2 and all("memory" not in s for s in steps)
    assert not list(out.glob("memory_step_*.json"))


def test_an_image_in_the_memory_and_in_the_previous_step_is_two_candidates():
    """Overlap: image 5 is a step-0 exemplar and one of step 1's images, so step 2 may keep it
    twice (once per step), as the official loops may; a third copy or a stranger is refused."""
    from types import SimpleNamespace

    from incseg.engine.memory import StepMemory
    from incseg.protocol import get_setting, step_info

    info = step_info(get_setting("voc", "15-1"), 2)
    source = SimpleNamespace(names=[f"img{i}" for i in range(10)])
    previous = [Exemplar(5, "img5", 0, (3,), 3), Exemplar(2, "img2", 0, (4,), 4)]
    memory = StepMemory(None, source, None, info, previous, np.array([5, 7]), 3)

    def raw(*entries):
        images = [Exemplar(i, f"img{i}", s, (c,), c).to_dict() for i, s, c in entries]
        return {"step": 2, "images": images}

    kept = memory.check(raw((5, 0, 3), (5, 1, 16), (2, 0, 4)))
    assert [(e.index, e.step) for e in kept] == [(5, 0), (5, 1), (2, 0)]
    with pytest.raises(ValueError, match="image 5 of step 1 is listed twice"):
        memory.check(raw((5, 0, 3), (5, 1, 16), (5, 1, 16)))
    with pytest.raises(ValueError, match=r"entry 2 \(index 7, 'img7'\) is not a candidate"):
        memory.check(raw((5, 0, 3), (5, 1, 16), (7, 0, 4)))
    with pytest.raises(ValueError, match=r"entry 1: classes \[17\] / 17 are not old ones"):
        memory.check(raw((5, 0, 3), (7, 1, 17), (2, 0, 4)))
