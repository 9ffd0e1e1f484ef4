"""One MiB training iteration at step 1 (ResNet-101 OS16, VOC 15-5) and one evaluation forward.

Each variant runs in a fresh process so that its peak resident memory (``ru_maxrss``) is its own:

* ``incseg``: the engine's iteration (``train_one_epoch`` on one batch): the old model is frozen
  and runs under ``no_grad`` in eval mode, so none of its activations are kept for backward;
* ``plop``: the same iteration with PLOP (both models return six maps for Local POD; background
  pixels pseudo-labelled with thresholds from one scan of the batch);
* ``mib+ucd``, ``reminder``: the engine's iteration with UCD's contrastive term on MiB (both
  models return their head and small logits) and with REMINDER (PLOP's iteration + CSW-KD, with
  random stored prototypes);
* ``rcil``: RCIL's iteration at step 1 on its two-branch model (after the step's merge), with
  unbiased CE, unbiased KD and pooled-cube distillation of six maps;
* ``ssul``, ``dkd``, ``star``: their iterations at step 1 on their own models (torchvision
  ResNet-101 with BN, the sigmoid layouts of ``incseg.models.heads``) with the method's frozen
  parts and LR groups; STAR with random stored statistics replaying 100 features per old class
  and iteration (the official count is one epoch's worth of each class's cells);
* ``naive``: the straightforward version: a second full model that still records its graph
  (a deep copy whose parameters require gradients), its outputs kept through backward;
* ``late_zero``: the engine's iteration as it was before, gradients cleared *after* the forwards
  (the previous iteration's gradients, one copy of every parameter, alive through both forwards);
* ``eval``: ``incseg.engine.evaluate.evaluate`` on one batch (forward, upsample, prediction with
  ``max(1).indices``, confusion matrix); ``eval_argmax``: the same with ``argmax(1)``, as before;
  ``eval_rcil``: ``eval`` on RCIL's merged model (each pair of branches runs as one folded conv).

``python -m benchmarks.train_step VARIANT CROP [--batch B] [--iters N] [--device cpu|cuda]
[--amp off|bf16] [--channels-last] [--compile]`` prints one JSON line (with ``--compile`` the
first, compiling, iteration is a warm-up and not timed).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time

import torch

from benchmarks.common import run_in_process
from incseg.config import MethodConfig
from incseg.engine.evaluate import evaluate
from incseg.engine.runtime import Runtime
from incseg.engine.train import Optimisation, Step, train_one_epoch
from incseg.methods import PLOP, MiB
from incseg.metrics import confusion_matrix
from incseg.models import build_segmenter
from incseg.models.rcil import parallel_layers, to_rcil
from incseg.protocol import get_setting, step_info

SIGMOID = ("ssul", "dkd", "star")  # methods with their own architecture and BN ResNet


def _model(device, channels_last, rcil=False, architecture="deeplabv3"):
    info = step_info(get_setting("voc", "15-5"), 1)
    model = build_segmenter(
        "resnet101",
        info.channels_per_step[:1],
        output_stride=16,
        norm="bn" if architecture in SIGMOID else "iabn",
        head_channels=256,
        pretrained="none",
        architecture=architecture,
    )
    if rcil:
        to_rcil(model, "iabn")
    old = copy.deepcopy(model)
    model.add_classifier(info.channels_per_step[-1])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return info, model.to(device, memory_format=fmt), old.to(device, memory_format=fmt)


def _calibrate_norms(net, images):
    """Random weights with batch norms frozen at their initial statistics overflow through 101
    layers; give every norm the statistics of one batch (cumulative average), as training would."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(images)
    net.eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(
    variant: str,
    crop: int,
    batch: int,
    iters: int,
    device: torch.device,
    amp: str,
    channels_last: bool,
    compile_model: bool = False,
) -> dict:
    torch.manual_seed(0)
    architecture = variant if variant in SIGMOID else "deeplabv3"
    info, model, old = _model(
        device, channels_last, rcil=variant in ("rcil", "eval_rcil"), architecture=architecture
    )
    images = torch.randn(batch, 3, crop, crop, device=device)
    targets = torch.randint(
        0, info.num_channels, (batch, crop, crop), device=device, dtype=torch.uint8
    )
    method = MiB()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    amp_dtype = torch.bfloat16 if amp == "bf16" else None
    rt = Runtime(device, amp_dtype=amp_dtype, channels_last=channels_last)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if variant in ("incseg", "plop", "mib+ucd", "reminder", "rcil", *SIGMOID):
        old.eval().requires_grad_(False)
        if variant in ("mib+ucd", "reminder", "rcil", *SIGMOID):
            method = MethodConfig(name=variant).build()
        if variant in SIGMOID:  # frozen parts and LR groups of the step
            for net in (model, old):  # frozen norms need statistics: one batch's, as if trained
                _calibrate_norms(net, images)
            method.init_new_classifier(model, info)
            method.begin_step(info, model)
            groups = method.param_groups(model, info)
            optimizer = torch.optim.SGD(
                [{"params": g["params"]} for g in groups], lr=1e-3, momentum=0.9, nesterov=True
            )
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        if variant == "star":
            old_classes = info.num_old_channels - 1
            method.stats = {
                "prototypes": torch.nn.functional.normalize(torch.randn(old_classes, 256), dim=1),
                "norms": torch.tensor([[4.0] * old_classes, [1.0] * old_classes]),
                "noise": torch.full((old_classes, 256), 0.05),
            }
            method.schedule = {
                "per_iteration": torch.full((old_classes,), 100),
                "extra_bg_ratio": 0.5,
            }
        if variant == "rcil":
            method.begin_step(info, model)  # the step-1 merge: branch 1 frozen
        if variant == "reminder":
            method.load_state_dict({"prototypes": torch.randn(info.num_old_channels, 256)})
        if variant == "plop":
            method = PLOP()
        if variant in ("plop", "reminder"):  # six maps per model for POD; pseudo-labels, one scan
            with torch.no_grad():
                scanned = method.scan(old(images, features=method.features), targets, info)
            method.end_scan(scanned, info)

        net = torch.compile(model) if compile_model else model

        opt = Optimisation(optimizer, scheduler, scaler)
        state = Step(info, [(images, targets)], model, old, opt, net=net)

        def step():
            train_one_epoch(state, method, rt, 0, log_interval=1)
    elif variant == "naive":

        def step():
            model.train()
            output = model(images)
            old_output = old(images)  # graph recorded and kept alive until the end of the step
            terms = method.losses(
                output, type(old_output)(old_output.logits.detach(), {}), targets, info
            )
            optimizer.zero_grad()
            sum(terms.values()).backward()
            optimizer.step()
            del old_output
    elif variant == "late_zero":
        old.eval().requires_grad_(False)

        def step():
            model.train()
            output = model(images)
            with torch.no_grad():
                old_output = old(images)
            loss = sum(method.losses(output, old_output, targets, info).values())
            optimizer.zero_grad(
                set_to_none=True
            )  # the previous gradients lived through both forwards
            loss.backward()
            optimizer.step()
    elif variant in ("eval", "eval_rcil"):
        if variant == "eval_rcil":  # the merged model of a step: each pair runs as one conv
            for layer in parallel_layers(model):
                layer.merge()

        def step():
            evaluate(model, [(images, targets)], info.num_channels, rt)
    elif variant == "eval_argmax":
        model.eval()

        @torch.no_grad()
        def step():
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                pred = model(images).logits.argmax(1)
            confusion_matrix(pred, targets, info.num_channels)
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    reset = lambda: None
    if variant in SIGMOID:
        # Random weights behind frozen norms overflow after one update (the gradient through 101
        # eval-mode norms is not re-centred); each timed iteration starts from the same weights.
        snapshot = copy.deepcopy(model.state_dict())

        def reset():
            model.load_state_dict(snapshot)
            optimizer.state.clear()

    step()  # warm-up
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        reset()  # outside the timed part
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "variant": variant,
        "crop": crop,
        "batch": batch,
        "device": str(device),
        "amp": amp,
        "channels_last": channels_last,
        "compile": compile_model,
        "threads": torch.get_num_threads(),
        "median_s": statistics.median(times),
        "images_per_s": batch / statistics.median(times),
        "peak_mib": peak,
        "peak_kind": "cuda allocated" if device.type == "cuda" else "process RSS",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step")
    parser.add_argument(
        "variant",
        choices=(
            "incseg",
            "plop",
            "mib+ucd",
            "reminder",
            "rcil",
            *SIGMOID,
            "naive",
            "late_zero",
            "eval",
            "eval_rcil",
            "eval_argmax",
        ),
    )
    parser.add_argument("crop", type=int)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("off", "bf16"), default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the trained model (incseg variant)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(
        args.variant,
        args.crop,
        args.batch,
        args.iters,
        torch.device(args.device),
        args.amp,
        args.channels_last,
        args.compile,
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _subprocess(*args: str) -> dict:
    return run_in_process("benchmarks.train_step", *args)


def bench_train_step(crops=(256, 512)) -> list:
    """Figures for ``python -m benchmarks``: MiB iteration (incseg vs naive vs gradients cleared
    late) and evaluation of one 512x512 image (``max`` vs ``argmax``), CPU. Variants alternate, so
    a change of machine load hits both sides."""
    from benchmarks.common import Figure

    figures = []
    for crop in crops:
        ours, naive, late = (_subprocess(v, str(crop)) for v in ("incseg", "naive", "late_zero"))
        work = f"ResNet-101 OS16, batch 2, crop {crop}, CPU {ours['threads']} threads"
        for name, result in (("incseg", ours), ("naive", naive), ("late_zero", late)):
            figures += [
                Figure(f"mib_iteration_{crop}_{name}", result["median_s"], "s", work),
                Figure(f"mib_iteration_{crop}_{name}_peak_rss", result["peak_mib"], "MiB", work),
            ]
    work = "ResNet-101 OS16, 1 image 512x512, forward + upsample + prediction + metric, CPU"
    ev, arg = (
        _subprocess(v, "512", "--batch", "1", "--iters", "7") for v in ("eval", "eval_argmax")
    )
    figures += [
        Figure("eval_image_512_max", ev["median_s"], "s", work),
        Figure("eval_image_512_argmax", arg["median_s"], "s", work),
    ]
    return figures


def bench_prediction() -> list:
    """``max(1).indices`` vs ``argmax(1)`` on the logits of one 512x512 image (21 channels)."""
    from benchmarks.common import Figure, median_time

    torch.manual_seed(0)
    figures = []
    for layout in ("contiguous", "channels_last"):
        logits = torch.randn(1, 21, 512, 512)
        if layout == "channels_last":
            logits = logits.contiguous(memory_format=torch.channels_last)
        assert torch.equal(logits.max(1).indices, logits.argmax(1))
        work = f"logits 1x21x512x512 float32, {layout}"
        by_max = median_time(lambda x=logits: x.max(1).indices, repeats=21)
        by_argmax = median_time(lambda x=logits: x.argmax(1), repeats=21)
        figures += [
            Figure(f"prediction_max_{layout}", by_max * 1e3, "ms", work),
            Figure(f"prediction_argmax_{layout}", by_argmax * 1e3, "ms", work),
        ]
    return figures
