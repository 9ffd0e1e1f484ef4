"""``run_protocol``: every step of a class-incremental setting, in one process.

For each step: select the step's images and remap their labels, grow the classifier and let the
method initialise it, let the method scan the step's data with the old model if it asks to
(``Method.scans_old_model``), train epoch by epoch, evaluate on all seen classes, save a checkpoint, and
freeze a copy of the model as the next step's old model. The next step starts from the last
epoch's weights (no model selection on the test set), as in the MiB paper. Where things live:
loaders (:mod:`~incseg.engine.loaders`), the run directory (:mod:`~incseg.engine.rundir`),
models and checkpoint restore (:mod:`~incseg.engine.models`), one epoch
(:mod:`~incseg.engine.train`), evaluation (:mod:`~incseg.engine.evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from incseg.config import Config, config_from_dict
from incseg.engine.distributed import SINGLE, DistInfo, barrier, local_batch_size
from incseg.engine.evaluate import evaluate
from incseg.engine.loaders import Sources, step_seed
from incseg.engine.models import (
    build_model,
    fetch_backbone_weights,
    frozen_copy,
    prepare_model,
    restore_finished,
    wrap_for_training,
)
from incseg.engine.rundir import TENSORBOARD_DIR, RunDir
from incseg.engine.runtime import Runtime
from incseg.engine.tensorboard import Scalars, check_tensorboard, open_scalars
from incseg.engine.train import Optimisation, scan_step, train_one_epoch
from incseg.errors import IncsegError
from incseg.methods import build_method, method_class
from incseg.methods.base import Method
from incseg.metrics import GROUPING, StepReport, iou_per_class
from incseg.protocol import StepInfo, get_setting, step_info
from incseg.report import format_step_table, format_summary, summary_markdown

log = logging.getLogger(__name__)
EPOCH_FORMAT = 2  # last.pt layout; an older one restarts its step instead of failing


def run_protocol(
    config: Config,
    run_dir: Path,
    *,
    dist: DistInfo = SINGLE,
    progress: bool = True,
    resume: bool = False,
    start_from: tuple[Path, int] | None = None,
) -> list[StepReport]:
    """Run every step of ``config``'s setting (up to ``protocol.last_step``) into ``run_dir``
    (layout: :mod:`incseg.engine.rundir`). ``dist`` is this process's identity under
    ``torchrun`` (every rank runs this function; rank 0 alone logs and writes files).

    With ``resume``, finished steps are restored instead of trained and an interrupted step
    continues after its last saved epoch, exactly as if never interrupted. ``start_from=(DIR,
    K)`` starts a new run with the finished steps 0..K of the run in DIR (copied unchanged; its
    config must train those steps as this one does, :func:`shared_steps_key`).

    Returns:
        One :class:`StepReport` per step (the same on every rank).
    """
    setting = get_setting(config.family, config.protocol.setting)
    last_step = (
        setting.num_steps - 1 if config.protocol.last_step is None else config.protocol.last_step
    )
    rt = Runtime.of(config, dist, progress=progress)
    local_batch_size(config.train.batch_size, dist.world_size)
    check_tensorboard(config.train.tensorboard)
    fetch_backbone_weights(config, dist)
    data = Sources.load(config, dist, progress=rt.progress)
    run, method = RunDir(run_dir), build_method(config.method.name, config.method.params)
    if start_from is not None:
        resume = adopt_steps(run, config, *start_from, dist) or resume
    metrics = {"setting": setting.name, "mode": config.protocol.mode, "method": config.method.name,
               "grouping": GROUPING, "steps": []}  # fmt: skip
    reports, model, old_model = [], None, None
    if resume:
        metrics["steps"], reports, model = restore_finished(run, config, last_step, method)
    if model is None:  # built now so that missing or foreign weights surface before any write
        torch.manual_seed(step_seed(config.train.seed, 0))
        model = build_model(config, step_info(setting, 0))
    else:
        model = prepare_model(model, config, rt)
        old_model = frozen_copy(model)
        log.info(f"resuming {run.path}: steps 0..{len(reports) - 1} finished and restored")
    barrier(dist)  # every rank has read the run directory before rank 0 writes into it
    if dist.is_main:
        run.start(config, resume=resume)
    scalars = open_scalars(config.train.tensorboard, run.path / TENSORBOARD_DIR, dist.is_main)
    try:
        for step in range(len(reports), last_step + 1):
            info = step_info(setting, step)
            loader = data.train_loader(config, info, dist)
            model = start_step(model, old_model, method, info, config, rt, loader)
            teacher = old_model if method.needs_old_model else None
            epochs = config.train.epochs_at(step)
            opt = Optimisation.for_step(model, config, info, epochs * len(loader), rt)
            history = resume_step(run, config, info, model, method, opt) if resume else []
            if method.scans_old_model and step > 0 and not history:  # else restored by resume_step
                scan_step(old_model, method, loader, info, rt)
            net = wrap_for_training(model, config, rt)
            for epoch in tqdm(
                range(len(history), epochs), desc=f"step {step}", disable=not rt.progress
            ):
                loader.batch_sampler.set_epoch(epoch)
                terms = train_one_epoch(model, teacher, method, loader, opt, info, rt, epoch=epoch, net=net,
                                        log_interval=config.train.log_interval, scalars=scalars)  # fmt: skip
                if config.train.val_interval and (epoch + 1) % config.train.val_interval == 0:
                    terms["val_miou"] = validate(model, data, config, info, rt)
                history.append(terms)
                scalars.add(f"step_{step}/epoch", terms, epoch + 1)
                every = config.train.checkpoint_every
                if dist.is_main and every and ((epoch + 1) % every == 0 or epoch + 1 == epochs):
                    run.save_epoch(
                        step, epoch + 1, epoch_state(config, model, method, opt, history)
                    )
            method.end_step(info, model, loader)
            reports.append(finish_step(run, data, config, info, model, method, rt, metrics, history, scalars,
                                       len(loader.dataset)))  # fmt: skip
            old_model = frozen_copy(model)
    finally:
        scalars.close()
    log.info(format_summary(reports))
    heading = f"{config.name}: {config.method.name} on {config.data.dataset} {setting.name} ({config.protocol.mode})"
    if dist.is_main:
        run.write_summary(summary_markdown(reports, heading, config.to_yaml()))
    barrier(dist)  # no rank returns before rank 0's files exist (compare reads them next)
    return reports


def start_step(
    model: nn.Module, old_model: nn.Module | None, method: Method, info: StepInfo, config: Config, rt: Runtime,
    loader,
) -> nn.Module:  # fmt: skip
    """A step's start, the same for a fresh and a resumed run: the classifier grows (seeded by the
    step) and the method initialises it; the model moves to the device; ``begin_step``."""
    if len(model.classifiers) == info.step:  # the model of the previous step: grow it
        torch.manual_seed(step_seed(config.train.seed, info.step))
        model.add_classifier(info.channels_per_step[-1])
        method.init_new_classifier(model, info)
    model = prepare_model(model, config, rt)
    method.begin_step(info, model, old_model if method.needs_old_model else None, loader)
    return model


def epoch_state(
    config: Config, model: nn.Module, method: Method, opt: Optimisation, history: list
) -> dict:
    """What an exact resume needs after an epoch besides the step's start: weights, what the
    method accumulated in the step, optimiser / LR / loss-scale state, the global RNG (the data
    order is a function of seed, step and epoch) and the epoch history."""
    return {"epoch_format": EPOCH_FORMAT, "config": config.to_dict(), "model": model.state_dict(),
            "method_step": method.step_state_dict(), **opt.state_dict(), "torch_rng": torch.get_rng_state(),
            "history": list(history)}  # fmt: skip


def resume_step(
    run: RunDir, config: Config, info: StepInfo, model: nn.Module, method: Method, opt: Optimisation
) -> list:
    """After :func:`start_step`, restore an interrupted step's mid-step state; returns the epoch
    history so far (empty: the step was not interrupted, or by an older incseg)."""
    partial = run.interrupted_step(config, info.step)
    if partial is None or partial.get("epoch_format") != EPOCH_FORMAT:
        return []
    model.load_state_dict(partial["model"])  # in place: the method's references stay valid
    method.load_step_state_dict(partial["method_step"])
    opt.load_state_dict(partial)
    torch.set_rng_state(partial["torch_rng"])
    log.info(f"resuming step {info.step} after epoch {partial['epochs_done']}")
    return list(partial["history"])


def validate(model: nn.Module, data: Sources, config: Config, info: StepInfo, rt: Runtime) -> float:
    """MiB's validation during training: mean IoU of the current step's classes on test images
    with a current class, old classes ignored (``train.val_interval``)."""
    loader = data.test_loader(config, info, rt.dist, split="val")
    matrix = evaluate(model, loader, info.num_channels, dataclasses.replace(rt, progress=False))
    model.train()
    iou = iou_per_class(matrix)[info.num_old_channels :]
    present = matrix.sum(1)[info.num_old_channels :] > 0
    return float(iou[present].mean()) if bool(present.any()) else float("nan")


def finish_step(
    run: RunDir, data: Sources, config: Config, info: StepInfo, model: nn.Module, method: Method, rt: Runtime,
    metrics: dict, losses: list, scalars: Scalars, num_train: int,
) -> StepReport:  # fmt: skip
    """Evaluate the trained step on all seen classes, record it (checkpoint, metrics, scalars) and
    print its table."""
    test = data.test_loader(config, info, rt.dist)
    matrix = evaluate(model, test, info.num_channels, rt)
    report = StepReport.from_confusion(matrix, info)
    metrics["steps"].append({**report.to_dict(), "num_train_images": num_train,
                             "num_test_images": len(test.dataset), "losses": losses})  # fmt: skip
    if rt.dist.is_main:
        run.save_step(info.step, {
            "setting": config.protocol.setting, "channels_per_step": list(info.channels_per_step),
            "config": config.to_dict(), "model": model.state_dict(), "method": method.state_dict(),
            "confusion": matrix.cpu(),
        }, metrics)  # fmt: skip
    scalars.add(
        "miou",
        {k: 100 * getattr(report, f"miou_{k}") for k in ("old", "new", "all", "with_bg")},
        info.step,
    )
    proto = config.protocol
    log.info(
        format_step_table(
            report,
            f"Step {info.step} of {config.data.dataset} {proto.setting} ({proto.mode}, "
            f"{config.method.name}): {num_train} train / {len(test.dataset)} test images",
        )
    )
    return report


def shared_steps_key(config: Config, step: int) -> str:
    """Runs with equal keys train the very same steps ``0..step``: their configs agree on everything
    but the run name and ``protocol.last_step``; for step 0 also the incremental-step keys, and the
    method too when both methods train step 0 with plain cross-entropy and no state
    (``Method.plain_first_step``)."""
    d = config.to_dict()
    d.pop("name")
    d["protocol"].pop("last_step")
    if step == 0:
        d["train"].pop("epochs_incremental")
        d["train"].pop("lr_incremental")
        if method_class(config.method.name).plain_first_step:
            d["method"] = "plain first step"
    return json.dumps(d, sort_keys=True)


def adopt_steps(run: RunDir, config: Config, source_dir: Path, step: int, dist: DistInfo) -> bool:
    """Start ``run`` with the finished steps ``0..step`` of the run in ``source_dir`` (copied
    unchanged, rank 0) when it has none yet; True when the run should now resume from them.

    Raises:
        IncsegError: the source is not a run, its steps were trained otherwise, or step ``step``
            is not finished there.
    """
    started = run.step_file(0).exists()
    barrier(dist)  # every rank has looked before rank 0 copies
    if started:
        return True  # started before: resuming continues it
    source = RunDir(source_dir)
    saved = source.saved_config()
    if saved is None:
        raise IncsegError(
            f"--start-from {source.path}: no config.yaml there; is it a run directory?"
        )
    if shared_steps_key(config_from_dict(saved), step) != shared_steps_key(config, step):
        raise IncsegError(f"--start-from {source.path}: its steps 0..{step} were trained with another "
                          "config (only the name, last_step and, for step 0, the incremental keys or a "
                          "plain-first-step method may differ)")  # fmt: skip
    if dist.is_main:
        run.adopt_steps(source, step, note=str(source.path))
    barrier(dist)
    return True
