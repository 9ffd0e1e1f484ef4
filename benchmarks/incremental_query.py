"""One training iteration of step 1 of ADE20K 100-50 for each query-based method of the second
generation against CoMFormer's, the cost of BalConpas-R's memory selection and of SimCIS's
collection pass and query bank.

Each training variant runs in a fresh process (its peak RSS is its own, as ``query_step``): a
Mask2Former R-101 (``Mask2FormerConfig`` official sizes, random weights, ``background: false``)
built with step 0's 100 classes, its copy frozen as the old model, then grown to step 1 (50 new
classes) as the engine grows it (``add_classifier``, the method's ``init_new_classifier`` and
``begin_step``), the method's parameter groups, AdamW (LR 5e-5, weight decay 0.05) and gradient
norm clipping at 0.01; the engine's iteration (``train_one_epoch`` on one batch of random
``N(0, 1)`` images and 6-class block labels of 1..150) after one warm-up, median of ``--iters``:

* ``comformer``: CoMFormer's model (softmax masks, its inference) and ``CoMFormer()`` (old model
  forward, pseudo-labels, focal CE, softmax mask losses, UKD);
* ``balconpas``: ``BalConpas()`` on Mask2Former's model (old model forward with its query
  states, pseudo targets, the set criterion, the query distillation at every prediction);
* ``eclipse``: ``ECLIPSE()`` on its model (MLP classifiers, 50 prompts, sigmoid inference): no
  old model; the frozen model runs forward, the prompts alone train.
* ``simcis``: ``SimCIS(virtual_queries=1)`` (100-50's) on its model (query-selection decoder,
  static head over 150 classes, FrozenBN): old model forward, pseudo targets, the criterion with
  box terms at every prediction, the distillation pass and its KL terms, one virtual query per
  image from a bank filled with 80 random tokens for each of the 100 old classes, and the bank's
  update (its own matching).
* ``simcis_scan``: the collection pass per batch: the old model's forward and ``SimCIS.scan``
  (pseudo targets and their class counts), and the bytes of the full bank (150 classes x 80
  tokens) in a checkpoint.

``memory``: :func:`incseg.protocol.memory.select_by_frequency` choosing 300 images among
``--candidates`` synthetic ones (each holding 1-8 of 100 classes, ADE20K's step 0 has 20,210
training images at most), in process, median of ``--iters``.

``python -m benchmarks.incremental_query VARIANT [--crop 512] [--batch 2] [--iters 2]`` prints
one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import resource
import statistics
import sys
import time

import numpy as np
import torch

from benchmarks.common import run_in_process
from benchmarks.query_step import _labels
from incseg.config import Mask2FormerConfig, TrainConfig
from incseg.engine.runtime import Runtime
from incseg.engine.train import Optimisation, Step, train_one_epoch
from incseg.methods.balconpas import BalConpas
from incseg.methods.comformer import CoMFormer
from incseg.methods.eclipse import ECLIPSE
from incseg.methods.simcis import SimCIS
from incseg.models import build_segmenter
from incseg.protocol import get_setting, step_info
from incseg.protocol.memory import Exemplar, select_by_frequency

VARIANTS = ("comformer", "balconpas", "eclipse", "simcis", "memory", "simcis_scan")
SIMCIS = {"decoder": "selection", "class_head": "static", "inference": "simcis"}
SIZES = {
    "comformer": {"mask_activation": "softmax", "inference": "comformer"},
    "balconpas": {},
    "eclipse": {"class_head": "mlp", "prompts": 50, "inference": "eclipse"},
    "simcis": SIMCIS | {"total_classes": 150},
}
METHODS = {
    "comformer": CoMFormer,
    "balconpas": BalConpas,
    "eclipse": ECLIPSE,
    "simcis": lambda: SimCIS(virtual_queries=1),
}


def _filled_bank(method: SimCIS, hidden: int, classes: int) -> None:
    gen = torch.Generator().manual_seed(1)
    method.bank = {c: torch.randn(80, hidden, generator=gen) for c in range(classes)}
    method.counts = torch.randint(0, 50, (100,), generator=gen)


def train_step(variant: str, crop: int, batch: int, iters: int) -> dict:
    torch.manual_seed(0)
    setting = get_setting("ade", "100-50")
    first, info = step_info(setting, 0), step_info(setting, 1)
    sizes = dataclasses.asdict(Mask2FormerConfig(background=False)) | SIZES[variant]
    model = build_segmenter(
        "resnet101",
        first.channels_per_step,
        norm="frozen_bn" if variant == "simcis" else "bn",
        pretrained="none",
        architecture="mask2former",
        query_sizes=sizes,
    )
    method = METHODS[variant]()
    old = None
    if method.needs_old_model:
        old = copy.deepcopy(model).eval().requires_grad_(False)
    model.add_classifier(info.channels_per_step[-1])
    method.init_new_classifier(model, info)
    method.begin_step(info, model)
    if variant == "simcis":
        _filled_bank(method, sizes["hidden_dim"], 100)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=gen)
    targets = _labels(batch, crop, 6, gen)
    targets = torch.where(targets > 50, targets + 50, targets)  # old and new classes
    rt = Runtime(torch.device("cpu"))
    train = TrainConfig(optimizer="adamw", lr=5e-5, weight_decay=0.05, clip_grad_norm=0.01)
    opt = Optimisation.for_step(
        model, train, 1, iterations=1000, rt=rt, groups=method.param_groups(model, info)
    )
    state = Step(info, [(images, targets)], model, old, opt)
    times = []
    for i in range(iters + 1):
        start = time.perf_counter()
        train_one_epoch(state, method, rt, 0, log_interval=1)
        if i:  # the first is the warm-up
            times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "variant": variant,
        "crop": crop,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "times_s": times,
        "median_s": statistics.median(times),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_m": trainable / 1e6,
        "old_model": old is not None,
    }


def collection_pass(crop: int, batch: int, iters: int) -> dict:
    """The old model's forward and ``SimCIS.scan`` on one batch of step 1 (median of ``iters``
    after a warm-up), and the full bank's size in a checkpoint."""
    torch.manual_seed(0)
    setting = get_setting("ade", "100-50")
    first, info = step_info(setting, 0), step_info(setting, 1)
    sizes = dataclasses.asdict(Mask2FormerConfig(background=False)) | SIMCIS
    old = build_segmenter(
        "resnet101",
        first.channels_per_step,
        norm="frozen_bn",
        pretrained="none",
        architecture="mask2former",
        query_sizes=sizes | {"total_classes": 150},
    ).eval()
    method = SimCIS()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=gen)
    targets = _labels(batch, crop, 6, gen)
    times = []
    for i in range(iters + 1):
        start = time.perf_counter()
        with torch.no_grad():
            counts = method.scan(old(images), targets, info)["counts"]
        if i:
            times.append(time.perf_counter() - start)
    _filled_bank(method, sizes["hidden_dim"], 150)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    return {
        "variant": "simcis_scan",
        "crop": crop,
        "batch": batch,
        "median_s": statistics.median(times),
        "counted": int(counts.sum()),
        "bank_mib": buffer.getbuffer().nbytes / 2**20,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def memory_selection(candidates: int, iters: int) -> dict:
    rng = np.random.default_rng(0)
    pool = []
    for i in range(candidates):
        held = rng.choice(np.arange(1, 101), size=int(rng.integers(1, 9)), replace=False)
        pool.append(Exemplar(i, f"img{i}", 0, tuple(sorted(int(c) for c in held))))
    counts = np.zeros(256)
    for e in pool:
        counts[list(e.classes)] += 1
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        chosen = select_by_frequency([], pool, counts, 0, 300)
        times.append(time.perf_counter() - start)
    return {
        "variant": "memory",
        "candidates": candidates,
        "chosen": len(chosen),
        "median_s": statistics.median(times),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.incremental_query")
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=20210)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.variant == "memory":
        result = memory_selection(args.candidates, args.iters)
    elif args.variant == "simcis_scan":
        result = collection_pass(args.crop, args.batch, args.iters)
    else:
        result = train_step(args.variant, args.crop, args.batch, args.iters)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def bench_incremental_query() -> list:
    """Figures for ``python -m benchmarks incremental_query``: step 1 of ADE20K 100-50 for
    CoMFormer, BalConpas and ECLIPSE (each in its own process) and BalConpas-R's selection."""
    from benchmarks.common import Figure

    figures = []
    for variant in VARIANTS[:4]:
        result = run_in_process("benchmarks.incremental_query", variant)
        work = f"{variant}, Mask2Former R-101, ADE20K 100-50 step 1, batch 2, crop 512, CPU"
        figures += [
            Figure(f"incremental_{variant}_iteration", result["median_s"], "s", work),
            Figure(f"incremental_{variant}_peak_rss", result["peak_mib"], "MiB", work),
        ]
    memory = run_in_process("benchmarks.incremental_query", "memory")
    work = "select_by_frequency, 300 of 20,210 candidates"
    figures.append(Figure("balconpas_memory_selection", memory["median_s"], "s", work))
    scan = run_in_process("benchmarks.incremental_query", "simcis_scan")
    work = "SimCIS collection pass: old model forward + scan, batch 2, crop 512, CPU"
    figures.append(Figure("simcis_collection_batch", scan["median_s"], "s", work))
    work = "SimCIS query bank, 150 classes x 80 tokens of 256, torch.save"
    return [*figures, Figure("simcis_bank_size", scan["bank_mib"], "MiB", work)]
