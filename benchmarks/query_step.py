"""One training iteration of the query-based model (Mask2Former R-101) against MiB's DeepLabV3
R-101, at the sizes of ADE20K 100-50 step 0, and the evaluation of one image.

Each variant runs in a fresh process so that its peak resident memory (``ru_maxrss``) is its own
(``benchmarks.train_step``'s convention); random weights, no download:

* ``m2f``: Mask2Former with ResNet-101 (BatchNorm, ``norm: bn``), the official ADE20K sizes
  (``Mask2FormerConfig()``: 100 queries, hidden 256, 9 decoder layers, 6 deformable encoder
  layers over res3-res5, 8 heads, 4 points) and ``background: false``: a head of the step's 100
  object classes plus no-object (ADE20K's channel 0 is void, for which Mask2Former trains no
  class). The iteration is the engine's (``train_one_epoch`` on one batch): forward,
  ``QueryFineTuning``'s set criterion (Hungarian matching, class CE, point-sampled mask BCE and
  dice at 12,544 points, at all 10 predictions), backward, gradient norm clipped at 0.01 and an
  AdamW step (LR 1e-4, weight decay 0.05) over ``QueryFineTuning().param_groups`` (backbone LR
  x0.1, no decay on norms and embeddings): Mask2Former's ``Base-ADE20K-SemanticSegmentation.yaml``
  optimiser.
* ``deeplab``: MiB's model, DeepLabV3 ResNet-101 OS16 with ``norm: iabn`` (BatchNorm +
  LeakyReLU 0.01, In-Place ABN's function), 101 channels (background included), MiB's loss at
  step 0 (the plain cross-entropy), SGD (Nesterov momentum 0.9, LR 0.01, weight decay 1e-4): the
  engine's iteration.

Both train on the same random batch: images ``N(0, 1)`` and labels made of 8x8 blocks of
``--classes`` distinct classes per image drawn from 1..100. The reported time is the median over
``--iters`` timed iterations after one warm-up; ``peak_mib`` is the process's peak RSS (CPU) or
``torch.cuda.max_memory_allocated`` (CUDA) at the end of the training iterations.

For ``m2f`` the share of the iteration in the deformable attention is measured in place, during
the timed iterations: ``incseg.models.mask2former.deform_attn.ms_deform_attn`` (the sampling core
of every ``MSDeformAttn``: one ``grid_sample`` per level and the weighted sum; not the module's
four linear layers) is replaced by a wrapper that times each call's forward with
``time.perf_counter`` and puts gradient hooks on its output and its three inputs. The backward of
a call runs from the moment its output's gradient is complete (output hook) until the first of
its inputs' producers is about to run (first input hook): the autograd engine runs ready nodes
newest first, so the call's own nodes, created after its inputs, all run in between and nothing
else does. On CUDA the wrapper and hooks synchronise the device, which slows the iteration.
``msda_module_forward_s`` is the forward of the whole ``MSDeformAttn`` modules (with their
linear layers), for reference.

``eval_s``: one image at the crop size, ``model.eval()`` under ``no_grad``: forward and
``model.prediction_scores(output)`` (Mask2Former's semantic inference: masks upsampled to the
input, ``softmax(class) x sigmoid(mask)`` summed over queries; DeepLab's softmax-free scores of
the upsampled logits), median of ``--eval-iters`` after one warm-up, after the training
iterations; the norms get the statistics of one training-mode pass first (random running
statistics overflow through 101 layers).

``python -m benchmarks.query_step VARIANT CROP [--batch B] [--iters N] [--eval-iters N]
[--device cpu|cuda] [--amp off|bf16]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time

import torch

from benchmarks.common import run_in_process
from incseg.config import Mask2FormerConfig, TrainConfig
from incseg.engine.runtime import Runtime
from incseg.engine.train import Optimisation, Step, train_one_epoch
from incseg.methods.mib import MiB
from incseg.methods.query import QueryFineTuning
from incseg.models import build_segmenter
from incseg.models.mask2former import deform_attn
from incseg.protocol import get_setting, step_info

VARIANTS = ("m2f", "deeplab")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _labels(batch: int, crop: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    """``(B, crop, crop)`` long: 8x8 blocks, each one of ``classes`` distinct classes of 1..100
    drawn per image (every one of them present)."""
    out = []
    for _ in range(batch):
        chosen = torch.randperm(100, generator=gen)[:classes] + 1
        blocks = torch.cat(
            [torch.arange(classes), torch.randint(classes, (64 - classes,), generator=gen)]
        )
        blocks = blocks[torch.randperm(64, generator=gen)].view(1, 1, 8, 8).float()
        grid = torch.nn.functional.interpolate(blocks, size=(crop, crop), mode="nearest")
        out.append(chosen[grid.long().view(crop, crop)])
    return torch.stack(out)


class DeformTimer:
    """Times every ``ms_deform_attn`` call (forward by the wall clock, backward between gradient
    hooks; see the module docstring) while installed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.forward_s = 0.0
        self.backward_s = 0.0
        self.calls = 0
        self.module_forward_s = 0.0
        self._original = deform_attn.ms_deform_attn
        self._module_forward = deform_attn.MSDeformAttn.forward

    def reset(self) -> None:
        self.forward_s = self.backward_s = self.module_forward_s = 0.0
        self.calls = 0

    def install(self) -> None:
        original, module_forward = self._original, self._module_forward

        def timed(value, spatial_shapes, sampling_locations, attention_weights):
            _sync(self.device)
            start = time.perf_counter()
            out = original(value, spatial_shapes, sampling_locations, attention_weights)
            _sync(self.device)
            self.forward_s += time.perf_counter() - start
            self.calls += 1
            inputs = [t for t in (value, sampling_locations, attention_weights) if t.requires_grad]
            if torch.is_grad_enabled() and out.requires_grad and inputs:
                span = {}

                def output_ready(grad):
                    _sync(self.device)
                    span["start"] = time.perf_counter()

                def input_ready(grad):
                    if "end" not in span:  # the first input's producer: the call's nodes are done
                        _sync(self.device)
                        span["end"] = time.perf_counter()
                        self.backward_s += span["end"] - span["start"]

                out.register_hook(output_ready)
                for tensor in inputs:
                    tensor.register_hook(input_ready)
            return out

        def module_timed(module, *args, **kwargs):
            _sync(self.device)
            start = time.perf_counter()
            out = module_forward(module, *args, **kwargs)
            _sync(self.device)
            self.module_forward_s += time.perf_counter() - start
            return out

        deform_attn.ms_deform_attn = timed
        deform_attn.MSDeformAttn.forward = module_timed

    def remove(self) -> None:
        deform_attn.ms_deform_attn = self._original
        deform_attn.MSDeformAttn.forward = self._module_forward


def _calibrate_norms(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Give every batch norm the statistics of one training-mode pass (cumulative average)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(images)


def run(
    variant: str,
    crop: int,
    batch: int,
    iters: int,
    eval_iters: int,
    classes: int,
    device: torch.device,
    amp: str,
) -> dict:
    torch.manual_seed(0)
    info = step_info(get_setting("ade", "100-50"), 0)
    if variant == "m2f":
        model = build_segmenter(
            "resnet101",
            info.channels_per_step,
            norm="bn",
            pretrained="none",
            architecture="mask2former",
            query_sizes=dataclasses.asdict(Mask2FormerConfig(background=False)),
        )
        method = QueryFineTuning()
        train = TrainConfig(optimizer="adamw", lr=1e-4, weight_decay=0.05, clip_grad_norm=0.01)
    elif variant == "deeplab":
        model = build_segmenter(
            "resnet101",
            info.channels_per_step,
            output_stride=16,
            norm="iabn",
            head_channels=256,
            pretrained="none",
        )
        method = MiB()
        train = TrainConfig(optimizer="sgd", lr=0.01, weight_decay=1e-4)
    else:
        raise SystemExit(f"unknown variant {variant!r}; valid: {VARIANTS}")
    model.to(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=gen).to(device)
    targets = _labels(batch, crop, classes, gen).to(device)
    rt = Runtime(device, amp_dtype=torch.bfloat16 if amp == "bf16" else None)
    groups = method.param_groups(model, info)
    opt = Optimisation.for_step(model, train, 0, iterations=1000, rt=rt, groups=groups)
    state = Step(info, [(images, targets)], model, None, opt)
    params = sum(p.numel() for p in model.parameters())

    def step():
        train_one_epoch(state, method, rt, 0, log_interval=1)  # reads the loss: non-finite stops

    timer = DeformTimer(device) if variant == "m2f" else None
    if timer is not None:
        timer.install()
    try:
        step()  # warm-up
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, deform = [], []
        for _ in range(iters):
            if timer is not None:
                timer.reset()
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
            if timer is not None:
                deform.append(
                    (timer.forward_s, timer.backward_s, timer.module_forward_s, timer.calls)
                )
    finally:
        if timer is not None:
            timer.remove()
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )

    # Evaluation of one image at the crop size.
    _calibrate_norms(model, images)
    model.eval()
    one = images[:1]

    @torch.no_grad()
    def evaluate():
        with rt.autocast():
            output = model(one)
        scores = model.prediction_scores(output)
        _sync(device)
        return scores

    scores = evaluate()  # warm-up
    eval_times = []
    for _ in range(eval_iters):
        start = time.perf_counter()
        evaluate()
        eval_times.append(time.perf_counter() - start)

    median = statistics.median(times)
    result = {
        "variant": variant,
        "crop": crop,
        "batch": batch,
        "device": str(device),
        "amp": amp,
        "threads": torch.get_num_threads(),
        "channels": info.num_channels,
        "head_classes": sum(
            getattr(c, "out_features", None) or c.out_channels for c in model.classifiers
        ),
        "params_m": params / 1e6,
        "iters": iters,
        "times_s": times,
        "median_s": median,
        "images_per_s": batch / median,
        "peak_mib": peak,
        "peak_kind": "cuda allocated" if device.type == "cuda" else "process RSS",
        "eval_s": statistics.median(eval_times),
        "eval_scores_finite": bool(torch.isfinite(scores).all()),
    }
    if deform:
        # Medians over the timed iterations; the share is of each iteration's own time.
        fwd = statistics.median(d[0] for d in deform)
        bwd = statistics.median(d[1] for d in deform)
        result |= {
            "msda_calls": deform[0][3],
            "msda_forward_s": fwd,
            "msda_backward_s": bwd,
            "msda_share": statistics.median(
                (d[0] + d[1]) / t for d, t in zip(deform, times, strict=True)
            ),
            "msda_module_forward_s": statistics.median(d[2] for d in deform),
        }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.query_step")
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("crop", type=int)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--eval-iters", type=int, default=3, help="timed evaluation repeats")
    parser.add_argument("--classes", type=int, default=6, help="classes per image (<= 64)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("off", "bf16"), default="off")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(
        args.variant,
        args.crop,
        args.batch,
        args.iters,
        args.eval_iters,
        args.classes,
        torch.device(args.device),
        args.amp,
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _subprocess(*args: str) -> dict:
    return run_in_process("benchmarks.query_step", *args)


def bench_query_step(crops=(512,)) -> list:
    """Figures for ``python -m benchmarks query_step``: one training iteration (batch 2, fp32)
    and one evaluated image of Mask2Former R-101 and of MiB's DeepLabV3 R-101 at ADE20K 100-50
    step 0, each in its own process, CPU; with Mask2Former's share in the deformable
    attention."""
    from benchmarks.common import Figure

    figures = []
    for crop in crops:
        m2f, deeplab = (_subprocess(v, str(crop)) for v in VARIANTS)
        setting = f"ADE20K 100-50 step 0, batch 2, fp32, crop {crop}, CPU {m2f['threads']} threads"
        models = {
            "m2f": "Mask2Former R-101 (100 queries, 6 enc + 9 dec layers)",
            "deeplab": "DeepLabV3 R-101 OS16 (MiB)",
        }
        works = {
            "m2f": f"{models['m2f']}, set criterion, AdamW; {setting}",
            "deeplab": f"{models['deeplab']}, cross-entropy, SGD; {setting}",
        }
        for name, result in (("m2f", m2f), ("deeplab", deeplab)):
            work = works[name]
            figures += [
                Figure(f"query_iteration_{crop}_{name}", result["median_s"], "s", work),
                Figure(f"query_iteration_{crop}_{name}_peak_rss", result["peak_mib"], "MiB", work),
                Figure(
                    f"query_eval_image_{crop}_{name}",
                    result["eval_s"],
                    "s",
                    f"{models[name]}: 1 image {crop}x{crop}, eval mode, no_grad, forward + "
                    "prediction_scores, CPU",
                ),
            ]
        figures.append(
            Figure(
                f"query_iteration_{crop}_m2f_msda_share",
                m2f["msda_share"] * 100,
                "%",
                f"ms_deform_attn forward + backward within the iteration; {works['m2f']}",
            )
        )
    return figures
