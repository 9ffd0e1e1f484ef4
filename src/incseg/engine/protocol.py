"""``run_protocol``: every step of a class-incremental setting, in one process.

For each step: select the step's images and remap their labels, grow the classifier and let the
method initialise it, train, evaluate on all seen classes, save a checkpoint, and freeze a copy of
the model as the next step's old model. The next step starts from the last epoch's weights (no
model selection on the test set), as in the MiB paper.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from incseg.config import Config, check_saved_config, config_from_dict
from incseg.data import Source, StepDataset, build_source
from incseg.data.transforms import test_transform, train_transform
from incseg.engine.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from incseg.engine.distributed import (
    DistInfo,
    EpochBatchSampler,
    barrier,
    convert_sync_bn,
    current_dist,
    init_distributed,
    local_batch_size,
    local_device,
    shard_indices,
)  # fmt: skip
from incseg.engine.evaluate import evaluate
from incseg.engine.faults import fault_point
from incseg.engine.tensorboard import Scalars, check_tensorboard, open_scalars
from incseg.engine.train import poly_lr_lambda, train_one_epoch
from incseg.errors import CheckpointError, ConfigError, DataError, IncsegError
from incseg.methods import METHODS, Method, build_method
from incseg.metrics import GROUPING, StepReport, iou_per_class
from incseg.models import IncrementalSegmenter, build_segmenter
from incseg.models.official import ensure_iabn_weights, load_iabn_imagenet
from incseg.protocol import StepInfo, get_setting, make_lut, select_test, select_train, step_info
from incseg.protocol.official import official_split, select_listed, uses_official
from incseg.protocol.selection import pack_presence
from incseg.report import format_step_table, format_summary, summary_markdown

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SINGLE = DistInfo()  # one process


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def step_seed(seed: int, step: int) -> int:
    """Seed of one step, so that a step's randomness does not depend on earlier steps' runs."""
    return seed * 1000 + step


def build_model(config: Config, info: StepInfo, *, pretrained: bool = True) -> IncrementalSegmenter:
    """A fresh segmenter with the classifiers of steps ``0..info.step``; ``pretrained=False``
    skips loading backbone weights (they are about to be overwritten by a checkpoint)."""
    m = config.model
    model = build_segmenter(
        m.backbone, info.channels_per_step, output_stride=m.output_stride, norm=m.norm,
        head_channels=m.head_channels, pretrained=m.pretrained if pretrained else "none",
    )  # fmt: skip
    if pretrained and (m.backbone_weights or m.pretrained == "iabn"):
        load_iabn_imagenet(model, m.backbone_weights or str(ensure_iabn_weights()))
    return model


def restore_step(checkpoint: dict) -> tuple[Config, StepInfo, IncrementalSegmenter]:
    """Rebuild the config, step and model saved in a loaded checkpoint (see ``load_checkpoint``)."""
    try:
        config = config_from_dict(checkpoint["config"])
    except ConfigError as err:
        raise CheckpointError(f"checkpoint config is not valid for this version of incseg: {err}") from None
    info = step_info(get_setting(config.family, config.protocol.setting), checkpoint["step"])
    if tuple(checkpoint["channels_per_step"]) != info.channels_per_step:
        raise CheckpointError(
            f"checkpoint classifier sizes {checkpoint['channels_per_step']} do not match step "
            f"{info.step} of {config.protocol.setting} {list(info.channels_per_step)}"
        )
    model = build_model(config, info, pretrained=False)
    state = checkpoint["model"]
    missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not fit a {config.model.backbone} model: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # same names, other shapes
        raise CheckpointError(f"checkpoint weights do not fit the model: {str(err).splitlines()[-1].strip()}") from None
    return config, info, model


def evaluate_checkpoint(checkpoint: dict, *, progress: bool = False) -> StepReport:
    """Re-evaluate a saved step on its test set, exactly as at the end of training."""
    config, info, model = restore_step(checkpoint)
    device = resolve_device(config.train.device)
    source = build_source(config.data, "test", progress=progress)
    # Inside a joined process group evaluate() sums over ranks, so each rank takes its shard.
    loader = build_test_loader(config, source, source.presence(), info, dist=current_dist())
    # The memory format of training too: channels-last convolutions round differently.
    model = prepare_model(model, config, SINGLE, device)
    matrix = evaluate(model, loader, info.num_channels, device=device, amp_dtype=AMP_DTYPES[config.train.amp],
                      progress=progress, channels_last=config.train.channels_last)  # fmt: skip
    return StepReport.from_confusion(matrix, info)


def _selected(indices: np.ndarray, split: str, config: Config, info: StepInfo) -> np.ndarray:
    if len(indices) == 0:
        proto = config.protocol
        raise DataError(
            f"step {info.step} of {proto.setting} ({proto.mode}) selects no {split} images "
            f"(new classes {list(info.new_classes)}); the dataset is too small for this setting"
        )
    return indices


def train_indices(
    config: Config, source: Source, presence: np.ndarray, info: StepInfo, log: Callable[[str], None] = print
) -> np.ndarray:
    """Training images of a step: the official lists where ``protocol.split_source`` picks them
    (:mod:`incseg.protocol.official`), else the rule applied to the class-presence index."""
    proto = config.protocol
    setting = get_setting(config.family, proto.setting).name
    if not uses_official(config.data.dataset, setting, proto.mode, proto.split_source):
        return select_train(presence, info, proto.mode)
    listed = official_split(config.data.dataset, setting, proto.mode)[info.step]
    indices, absent = select_listed(source.names, listed)
    if absent:
        log(f"note: step {info.step}: {absent} of the {len(listed)} images of the official list "
            f"are not in {config.data.root}")  # fmt: skip
    return indices


def build_train_loader(
    config: Config, source: Source, presence: np.ndarray, info: StepInfo, log: Callable[[str], None] = print,
    dist: DistInfo = SINGLE,
) -> DataLoader:
    """Shuffled training loader of a step (images from :func:`train_indices`).

    Batches come from an :class:`EpochBatchSampler`: the order and each image's augmentation
    seed depend only on ``train.seed``, the step and the epoch (call ``set_epoch``), and under
    ``torchrun`` this rank gets its share of every global batch.
    """
    data, cfg, proto = config.data, config.train, config.protocol
    indices = _selected(train_indices(config, source, presence, info, log), "training", config, info)
    if len(indices) < dist.world_size:
        raise DataError(f"step {info.step} has {len(indices)} training images, fewer than the "
                        f"{dist.world_size} processes")  # fmt: skip
    # Batch norm in training needs two or more values per channel, and the ASPP pooling branch
    # has one per image: over the global batch with synchronised BN, else per process.
    batch = min(cfg.batch_size, len(indices))
    shared = dist.world_size > 1 and cfg.sync_bn
    if batch < 2 or (not shared and batch // dist.world_size < 2):
        raise DataError(
            f"step {info.step}: {len(indices)} training image(s) and train.batch_size {cfg.batch_size} give "
            f"batches of {batch // (1 if shared else dist.world_size)} image(s) per process; batch norm "
            "needs 2 or more (use more images or a larger batch)"
        )
    dataset = StepDataset(
        source, indices, make_lut(info, "train", proto.labels),
        train_transform(data.crop_size, (data.scale_min, data.scale_max)),
    )  # fmt: skip
    sampler = EpochBatchSampler(len(dataset), cfg.batch_size, step_seed(cfg.seed, info.step),
                                dist.rank, dist.world_size)  # fmt: skip
    # The generator only seeds the workers (transforms are seeded per image); having one keeps
    # starting an epoch from drawing on the global RNG.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=data.num_workers,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip


def build_test_loader(
    config: Config, source: Source, presence: np.ndarray, info: StepInfo, split: str = "test",
    dist: DistInfo = SINGLE,
) -> DataLoader:
    """Test loader of a step: images with a seen class, labels in the step's test convention.

    ``split="val"`` gives MiB's validation during training instead: test-split images with a
    class of the current step, old classes mapped to 255 (SPEC section 4). Under ``torchrun``
    the loader holds this rank's shard (every N-th image, none repeated); ``evaluate`` sums the
    ranks' matrices.
    """
    proto = config.protocol
    ignore_zero = config.family == "ade" and proto.labels == "mib"
    if split == "test":
        chosen = select_test(presence, info, proto.mode if proto.test_selection == "mode" else None)
    else:
        chosen = select_train(presence, info, "overlap")
    indices = _selected(chosen, split, config, info)
    lut = make_lut(info, split, proto.labels, ignore_zero_at_test=ignore_zero)
    dataset = StepDataset(source, indices, lut, test_transform(config.data.test_crop))
    # Full images of different sizes cannot share a batch; padding would change the ASPP's
    # image-level pooling, so they are evaluated one at a time.
    same_size = config.data.test_crop is not None or getattr(source, "fixed_size", True)
    batch = config.train.eval_batch_size if same_size else 1
    # An own generator: starting this loader must not draw from the global RNG that drives the
    # training augmentations, so validating leaves training unchanged.
    return DataLoader(dataset, batch_size=batch, num_workers=config.data.num_workers,
                      sampler=shard_indices(len(dataset), dist.rank, dist.world_size),
                      generator=torch.Generator().manual_seed(0))  # fmt: skip


def train_step(
    config: Config,
    model: nn.Module,
    old_model: nn.Module | None,
    method: Method,
    loader: DataLoader,
    info: StepInfo,
    device: torch.device,
    progress: bool,
    validate: Callable[[], float] | None = None,
    *,
    resume: dict | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    net: nn.Module | None = None,
    scalars: Scalars | None = None,
) -> list[dict[str, float]]:
    """Train one step with SGD (Nesterov momentum) and a per-iteration poly LR; return per-epoch
    mean loss terms. With ``validate``, every ``train.val_interval`` epochs its value is added
    to that epoch's entry as ``val_miou``.

    ``on_epoch_end(state)`` receives after each epoch what an exact resume needs besides the
    model and method: epochs done, optimizer, scheduler and scaler states, the global RNG state
    and the history so far (the data order is a function of the epoch); ``resume`` is such a
    state to continue from. ``net`` is the DDP / compiled wrapper that runs the forward pass;
    ``scalars`` receives the logged losses and LR.
    """
    cfg = config.train
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr_at(info.step), momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay,
    )  # fmt: skip
    epochs = cfg.epochs_at(info.step)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lr_lambda(epochs * len(loader), cfg.lr_power)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    history: list[dict[str, float]] = []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["torch_rng"])
        history = list(resume["history"])
    scalars = scalars or Scalars(None)
    prefix = f"step_{info.step}"
    for epoch in tqdm(range(len(history), epochs), desc=f"step {info.step}", disable=not progress):
        loader.batch_sampler.set_epoch(epoch)
        terms = train_one_epoch(
            model, old_model, method, loader, optimizer, scheduler, scaler, info,
            epoch=epoch, device=device, amp_dtype=AMP_DTYPES[cfg.amp],
            log_interval=cfg.log_interval, progress=progress, net=net, channels_last=cfg.channels_last,
            on_log=(lambda it, values: scalars.add(f"{prefix}/train", values, it)) if scalars.enabled else None,
        )  # fmt: skip
        if validate is not None and cfg.val_interval and (epoch + 1) % cfg.val_interval == 0:
            terms["val_miou"] = validate()
            model.train()
        history.append(terms)
        scalars.add(f"{prefix}/epoch", terms, epoch + 1)
        if on_epoch_end is not None:
            on_epoch_end({
                "epochs_done": epoch + 1, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
            })  # fmt: skip
    return history


LAST = "last.pt"  # the latest epoch checkpoint of the unfinished step


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """``RUN_DIR/metrics.json``, written atomically (a reader never sees half a file)."""
    atomic_write(run_dir / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))


def interrupted_step(run_dir: Path, config: Config, step: int) -> dict | None:
    """The epoch checkpoint of ``step`` in ``run_dir``, if the run was interrupted during it."""
    path = run_dir / LAST
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    if state.get("kind") != "epoch" or state.get("step") != step or state.get("config") != config.to_dict():
        return None
    return state


def finished_steps(
    run_dir: Path, config: Config, last_step: int, method: Method
) -> tuple[list[dict], list[StepReport], IncrementalSegmenter | None]:
    """What a resumed run keeps: the metrics and reports of the finished steps (those with both a
    checkpoint and a metrics entry) and the model of the last one, whose method state is loaded
    into ``method``.

    Raises:
        ConfigError: ``run_dir`` was made with another config (the differing keys are listed).
    """
    check_saved_config(run_dir, config, "resume")
    try:
        steps = json.loads((run_dir / "metrics.json").read_text())["steps"]
    except (OSError, ValueError, KeyError):
        steps = []
    done = 0
    while done < min(len(steps), last_step + 1) and (run_dir / f"step_{done}.pt").is_file():
        done += 1
    if done == 0:
        return [], [], None
    reports = []
    for step in range(done):
        checkpoint = load_checkpoint(run_dir / f"step_{step}.pt")
        _, info, model = restore_step(checkpoint)
        reports.append(StepReport.from_confusion(checkpoint["confusion"], info))
    method.load_state_dict(checkpoint["method"])
    # Entries are refreshed from the confusion matrices (files of older versions grouped otherwise).
    return [{**entry, **report.to_dict()} for entry, report in zip(steps, reports)], reports, model


def first_step_key(config: Config) -> str | None:
    """Runs with equal keys train the same step-0 model: everything but the method (and the run
    name) equal, and a method whose step 0 is plain cross-entropy without state. None otherwise."""
    if not METHODS[config.method.name].plain_first_step:
        return None
    rest = {k: v for k, v in config.to_dict().items() if k not in ("method", "name")}
    return json.dumps(rest, sort_keys=True)


def adopt_first_step(source_dir: Path, run_dir: Path, config: Config) -> None:
    """Start ``run_dir`` with the finished step 0 of ``source_dir`` (same :func:`first_step_key`),
    so that ``run_protocol(config, run_dir, resume=True)`` continues at step 1.

    The checkpoint is rewritten with ``config`` and the fresh state of ``config``'s method (such
    methods keep none from step 0); the metrics entry of step 0 is copied and records
    ``first_step_from``. Raises ``CheckpointError`` if the source has no finished step 0.
    """
    checkpoint = load_checkpoint(source_dir / "step_0.pt")
    key = first_step_key(config)
    if key is None or checkpoint.get("step") != 0 or key != first_step_key(config_from_dict(checkpoint["config"])):
        raise CheckpointError(f"{source_dir}: its step 0 was not trained like the one of {config.method.name}")
    try:
        source_metrics = json.loads((source_dir / "metrics.json").read_text())
        first = source_metrics["steps"][0]
    except (OSError, ValueError, KeyError, IndexError):
        raise CheckpointError(f"{source_dir}: no metrics of a finished step 0") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    method = build_method(config.method.name, config.method.params)
    save_checkpoint(run_dir / "step_0.pt", {**checkpoint, "config": config.to_dict(), "method": method.state_dict()})
    metrics = {**source_metrics, "method": config.method.name,
               "steps": [{**first, "first_step_from": str(source_dir)}]}  # fmt: skip
    write_metrics(run_dir, metrics)


def current_class_miou(matrix: torch.Tensor, info: StepInfo) -> float:
    """Mean IoU over the current step's channels that have ground truth (validation)."""
    iou = iou_per_class(matrix)[info.num_old_channels :]
    present = matrix.sum(1)[info.num_old_channels :] > 0
    return float(iou[present].mean()) if bool(present.any()) else float("nan")


def frozen_copy(model: nn.Module) -> nn.Module:
    """The old model: a deep copy in eval mode with gradients off (never wrapped in DDP)."""
    old = copy.deepcopy(model).eval()
    old.requires_grad_(False)
    return old


def wrap_for_training(model: nn.Module, config: Config, dist: DistInfo, device: torch.device) -> nn.Module:
    """The module that runs the training forward pass: ``model`` itself, or its DDP wrapper
    (several processes), compiled when ``train.compile`` is set. Parameters stay shared."""
    net: nn.Module = model
    if dist.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.train.compile:
        net = torch.compile(net)
    return net


def prepare_model(model: nn.Module, config: Config, dist: DistInfo, device: torch.device) -> nn.Module:
    """Move to ``device`` (channels-last if asked) and synchronise batch norm across processes."""
    if dist.distributed and config.train.sync_bn:
        convert_sync_bn(model, device)
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format)


def run_protocol(
    config: Config,
    run_dir: Path,
    *,
    progress: bool = True,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> list[StepReport]:
    """Run every step of ``config``'s setting (up to ``protocol.last_step``); write into
    ``run_dir`` the resolved config, ``step_K.pt`` per step, ``metrics.json``, ``summary.md``
    and (``train.tensorboard``) TensorBoard scalars under ``tensorboard/``.

    With ``resume``, the steps already finished in ``run_dir`` (checkpoint and metrics written)
    are restored instead of trained, and the run continues from the first unfinished step. Every
    step re-seeds from ``train.seed``, so a resumed run gives the same numbers as one that was
    never interrupted.

    Launched by ``torchrun``, every process runs this function: each trains on its share of
    every global batch (DDP), evaluates its shard of the test set, and rank 0 alone logs and
    writes files (``run_dir`` must be on a file system all ranks see, to resume).

    Returns:
        One :class:`StepReport` per step (the same on every rank).
    """
    setting = get_setting(config.family, config.protocol.setting)
    last_step = setting.num_steps - 1 if config.protocol.last_step is None else config.protocol.last_step
    device = local_device(resolve_device(config.train.device))
    amp_dtype = AMP_DTYPES[config.train.amp]
    dist = init_distributed(device)
    local_batch_size(config.train.batch_size, dist.world_size)
    check_tensorboard(config.train.tensorboard)
    if not dist.is_main:
        log, progress = (lambda _message: None), False
    if config.model.pretrained == "iabn" and not config.model.backbone_weights:
        if dist.is_main:  # fetched (or its absence reported) before any data work
            ensure_iabn_weights()
        barrier()
    # Data problems surface before anything is written into the run directory. Rank 0 builds
    # the class index (and its cache) first; the others then read the cache.
    if not dist.is_main:
        barrier()
    sources = (build_source(config.data, "train", progress=progress),
               build_source(config.data, "test", progress=progress))  # fmt: skip
    if dist.is_main:
        barrier()
    # Built (or read from the cache) once; every step selects from the packed bit sets.
    presences = (pack_presence(sources[0].presence()), pack_presence(sources[1].presence()))
    run_dir = Path(run_dir)
    method = build_method(config.method.name, config.method.params)
    model: IncrementalSegmenter | None = None  # the model of the last finished step
    old_model: nn.Module | None = None
    reports: list[StepReport] = []
    metrics: dict = {"setting": setting.name, "mode": config.protocol.mode,
                     "method": config.method.name, "grouping": GROUPING, "steps": []}  # fmt: skip
    if resume:
        metrics["steps"], reports, model = finished_steps(run_dir, config, last_step, method)
        if model is not None:
            model = prepare_model(model, config, dist, device)
            old_model = frozen_copy(model)
            log(f"resuming {run_dir}: steps 0..{len(reports) - 1} finished and restored")
    if model is None:  # built now so that missing or foreign weights surface before any write
        torch.manual_seed(step_seed(config.train.seed, 0))
        model = build_model(config, step_info(setting, 0))
    barrier()  # every rank has read the run directory before rank 0 writes into it
    if dist.is_main:
        for stale in run_dir.glob(".*.tmp") if resume else ():  # left by a killed write
            stale.unlink()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(config.to_yaml())
        except OSError as err:
            raise IncsegError(f"run directory {run_dir}: cannot write ({err.strerror})") from None
    scalars = open_scalars(config.train.tensorboard, run_dir, dist.is_main)
    try:
        for step in range(len(reports), last_step + 1):
            info = step_info(setting, step)
            train_data = build_train_loader(config, sources[0], presences[0], info, log, dist)
            test_data = build_test_loader(config, sources[1], presences[1], info, dist=dist)
            if len(model.classifiers) == step:  # the model of step - 1: grow it
                torch.manual_seed(step_seed(config.train.seed, step))
                model.add_classifier(info.channels_per_step[-1])
                method.init_new_classifier(model, info)
            model = prepare_model(model, config, dist, device)
            teacher = old_model if method.needs_old_model else None
            partial = interrupted_step(run_dir, config, step) if resume else None
            if partial is not None:
                model.load_state_dict(partial["model"])
                method.load_state_dict(partial["method"])
                log(f"resuming step {step} after epoch {partial['epochs_done']}")
            method.begin_step(info, model, teacher, train_data)
            if partial is not None:
                method.load_step_state_dict(partial["method_step"])
            validate = None
            if config.train.val_interval:
                val_data = build_test_loader(config, sources[1], presences[1], info, split="val", dist=dist)

                def validate(model=model, val_data=val_data, info=info):
                    matrix = evaluate(model, val_data, info.num_channels, device=device, amp_dtype=amp_dtype,
                                      channels_last=config.train.channels_last)  # fmt: skip
                    return current_class_miou(matrix, info)

            def save_epoch(state, step=step, model=model):
                every = config.train.checkpoint_every
                done = state["epochs_done"]
                if dist.is_main and every and (done % every == 0 or done == config.train.epochs_at(step)):
                    save_checkpoint(run_dir / LAST, {
                        **state, "kind": "epoch", "step": step, "config": config.to_dict(),
                        "model": model.state_dict(), "method": method.state_dict(),
                        "method_step": method.step_state_dict(),
                    })  # fmt: skip
                    fault_point(f"epoch:{step}:{done}")

            losses = train_step(
                config, model, teacher, method, train_data, info, device, progress, validate,
                resume=partial, on_epoch_end=save_epoch, net=wrap_for_training(model, config, dist, device),
                scalars=scalars,
            )  # fmt: skip
            method.end_step(info, model, train_data)

            matrix = evaluate(model, test_data, info.num_channels, device=device, amp_dtype=amp_dtype,
                              progress=progress, channels_last=config.train.channels_last)  # fmt: skip
            report = StepReport.from_confusion(matrix, info)
            reports.append(report)
            metrics["steps"].append({**report.to_dict(), "num_train_images": len(train_data.dataset),
                                     "num_test_images": len(test_data.dataset), "losses": losses})  # fmt: skip
            if dist.is_main:
                save_checkpoint(run_dir / f"step_{step}.pt", {
                    "step": step, "setting": setting.name, "channels_per_step": list(info.channels_per_step),
                    "config": config.to_dict(), "model": model.state_dict(), "method": method.state_dict(),
                    "confusion": matrix.cpu(),
                })  # fmt: skip
                write_metrics(run_dir, metrics)
                (run_dir / LAST).unlink(missing_ok=True)  # superseded by step_K.pt
                fault_point(f"step:{step}")
            scalars.add("miou", {k: 100 * getattr(report, f"miou_{k}") for k in ("old", "new", "all", "with_bg")}, step)
            title = (f"Step {step}/{last_step} of {config.data.dataset} {setting.name} "
                     f"({config.protocol.mode}, {config.method.name}): "
                     f"{len(train_data.dataset)} train / {len(test_data.dataset)} test images")  # fmt: skip
            log(format_step_table(report, title))
            old_model = frozen_copy(model)
    finally:
        scalars.close()

    log(format_summary(reports))
    heading = f"{config.name}: {config.method.name} on {config.data.dataset} {setting.name} ({config.protocol.mode})"
    if dist.is_main:
        (run_dir / "summary.md").write_text(summary_markdown(reports, heading, config.to_yaml()))
    barrier()  # no rank returns before rank 0's files exist (compare reads them next)
    return reports
