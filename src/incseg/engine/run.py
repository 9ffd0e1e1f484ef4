"""``run_protocol``: every step of a class-incremental setting, in one process.

The protocol (docs/design.md, "The step lifecycle"): for each step, select the step's images and
remap their labels, grow the classifier and let the method initialise it, let the method scan
the step's data with the old model if it asks to, train epoch by epoch, evaluate on all seen
classes, save a checkpoint, and freeze a copy of the model as the next step's old model. The
next step starts from the last epoch's weights (no model selection on the test set), as in the
MiB paper.

What lives for the run is a :class:`Run`; what lives for one step is a
:class:`~incseg.engine.train.Step`. A new per-step concern goes into :meth:`Run.start`
(before training), :meth:`Run.before_training`, :meth:`Run.train_epoch` or :meth:`Run.finish`
(after training), with its state on the :class:`Step`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn
from tqdm import tqdm

from incseg.config import Config
from incseg.engine.adopt import check_belongs
from incseg.engine.distributed import SINGLE, DistInfo, barrier
from incseg.engine.evaluate import evaluate
from incseg.engine.loaders import Extras, Sources, step_seed
from incseg.engine.memory import StepMemory
from incseg.engine.model_io import build_model, fetch_backbone_weights, frozen_copy, restore_step
from incseg.engine.plan import check_can_train, plan_steps
from incseg.engine.rundir import TENSORBOARD_DIR, RunDir
from incseg.engine.runtime import Runtime
from incseg.engine.tensorboard import Scalars, check_tensorboard, open_scalars
from incseg.engine.train import Optimisation, Step, StepData, scan_old_model, train_one_epoch
from incseg.methods.base import Method
from incseg.metrics import GROUPING, StepReport, iou_per_class
from incseg.protocol import Setting, StepInfo, step_info
from incseg.protocol.memory import Exemplar, memory_summary
from incseg.published import summary_lines
from incseg.report import format_step_table, format_summary, summary_markdown

log = logging.getLogger(__name__)
EPOCH_FORMAT = 2  # last.pt layout; an older one restarts its step instead of failing


def run_protocol(
    config: Config,
    run_dir: Path,
    *,
    method: Method | None = None,
    dist: DistInfo = SINGLE,
    progress: bool = True,
    resume: bool = False,
) -> list[StepReport]:
    """Run every step of ``config``'s setting (up to ``protocol.last_step``) into ``run_dir``
    (layout: :mod:`incseg.engine.rundir`) and return one :class:`StepReport` per step (the same
    on every rank).

    ``method`` defaults to the one ``config.method`` names (built once, here). ``dist`` is this
    process's identity under ``torchrun``: every rank runs this function, rank 0 alone logs and
    writes files. With ``resume``, finished steps are restored instead of trained and an
    interrupted step continues after its last saved epoch, exactly as if never interrupted
    (a run started from another's steps, :func:`incseg.engine.adopt.adopt_steps`, resumes).
    """
    rt = Runtime.of(config, dist, progress=progress)
    with Run.open(config, run_dir, method or config.method.build(), rt, resume=resume) as run:
        for index in run.remaining_steps():
            step = run.start(index)  # images, labels, classifier, the method's step start
            run.before_training(step)  # the method's scan of the step's data, if it asks
            for epoch in run.epochs(step):
                run.train_epoch(step, epoch)
            run.finish(step)  # evaluation, checkpoint; the model becomes the old model
        run.summarise()
    return run.reports


@dataclass
class Run:
    """What lives for a run: its config, runtime, directory, data sources, method, scalars and
    metrics, the finished steps' reports, and the models carried from step to step. Made by
    :meth:`open`; used as a context manager that closes the scalars."""

    config: Config
    files: RunDir
    method: Method
    rt: Runtime
    data: Sources
    resume: bool = False
    setting: Setting = field(init=False)
    reports: list[StepReport] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None  # the last finished step's model
    old_model: nn.Module | None = None  # its frozen copy, the next step's old model
    memory: list[Exemplar] = field(default_factory=list)  # the last finished step's memory
    seeded_from: str | None = None  # step 0's weights file, evaluated instead of trained
    scalars: Scalars = field(default_factory=lambda: Scalars(None))

    def __post_init__(self) -> None:
        self.setting = self.config.setting
        self.metrics = {
            "setting": self.setting.name,
            "mode": self.config.protocol.mode,
            "method": self.config.method.name,
            "stores": self.config.method.build().stores(),
            "grouping": GROUPING,
            "steps": [],
        }

    @classmethod
    def open(
        cls, config: Config, run_dir: Path, method: Method, rt: Runtime, *, resume: bool
    ) -> Run:
        """Check and load everything a run needs before writing anything (backbone weights,
        data, the finished steps of a resumed run, the first model), then write the config."""
        check_tensorboard(config.train.tensorboard)
        seeded = resume and RunDir(run_dir).seed_file.is_file()  # --start-from FILE.pt's weights
        if not seeded:
            fetch_backbone_weights(config, rt.dist)
        data = Sources.load(config, rt.dist, progress=rt.progress)
        run = cls(config, RunDir(run_dir), method, rt, data, resume)
        if resume:
            run.restore_finished()
        # the checks `incseg run --dry-run` makes too: every step can train, memory, saliency
        check_can_train(config, data, method, plan_steps(config, data, first=len(run.reports)))
        if run.model is None:  # built now: missing or foreign weights surface before any write
            torch.manual_seed(step_seed(config.train.seed, 0))
            if not seeded:
                run.model = build_model(config, step_info(run.setting, 0))
            else:  # read only while step 0 is still to be evaluated
                seed = run.files.seed()
                run.model = restore_step(seed)[2]
                run.seeded_from = seed.get("seeded_from", str(run.files.seed_file))
        barrier(rt.dist)  # every rank has read the run directory before rank 0 writes into it
        tensorboard = run.files.path / TENSORBOARD_DIR
        run.scalars = open_scalars(config.train.tensorboard, tensorboard, rt.dist.is_main)
        if rt.dist.is_main:
            run.files.start(config, resume=resume)
        return run

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        failed = kind is not None and not self.resume and self.rt.dist.is_main
        if failed and self.files.undo_start():  # a failed start leaves nothing behind
            self.scalars.discard()
        self.scalars.close()

    def remaining_steps(self) -> range:
        return range(len(self.reports), self.config.num_steps)

    def restore_finished(self) -> None:
        """Restore the finished steps of the run directory: their metrics (refreshed from the saved
        confusion matrices: files of older versions grouped the classes otherwise) and reports,
        the last one's model, its frozen copy and the method's state. Every checkpoint is checked
        to be this run's before its step counts as restored.

        Raises:
            ConfigError: the run directory was made with another config (the keys are listed).
            CheckpointError: a step checkpoint is corrupt, unreadable or another run's.
        """
        self.files.check_config(self.config, "resume")
        last = None
        for index, (entry, checkpoint) in enumerate(self.files.finished(self.config.num_steps)):
            check_belongs(self.files.step_file(index), checkpoint, self.config, index)
            report = StepReport.from_confusion(
                checkpoint["confusion"], step_info(self.setting, index)
            )
            self.reports.append(report)
            self.metrics["steps"].append({**entry, **report.to_dict()})
            last = checkpoint  # only the last step's model and method state are restored
        if last is not None:
            self.memory = [Exemplar.from_dict(raw) for raw in last.get("memory", [])]
            self.method.load_state_dict(last["method"])
            self.model = self.rt.place(restore_step(last)[2])
            self.old_model = frozen_copy(self.model)
            log.info(
                f"resuming {self.files.path}: steps 0..{len(self.reports) - 1} finished and restored"
            )

    def start(self, index: int) -> Step:
        """A step's start, the same for a fresh and a resumed run: its training images, the
        classifier grown (seeded by the step) and initialised by the method, the model on the
        device, ``begin_step``, the optimiser; then, when resuming, the interrupted step's
        mid-step state."""
        info = step_info(self.setting, index)
        memory = self.step_memory(info)
        listed = sorted(memory, key=lambda e: e.index)  # by image id, as the codes list them
        luts = [self.method.memory_lut(info, e) for e in listed]
        extras = Extras(
            self.method.unknown_from,
            tuple(e.index for e in listed),
            torch.stack(luts) if luts and luts[0] is not None else None,
            self.method.memory_mixing,
        )
        loader = self.data.train_loader(info, extras)
        model = self.model
        if len(model.classifiers) == index:  # the model of the previous step: grow it
            torch.manual_seed(step_seed(self.config.train.seed, index))
            model.add_classifier(info.channels_per_step[-1])
            self.method.init_new_classifier(model, info)
        model = self.rt.place(model)
        self.method.begin_step(info, model)
        epochs, iterations = self.config.train.schedule_at(index, len(loader))
        if index == 0 and self.seeded_from is not None:
            epochs = 0  # its weights are the seed's (engine/adopt.py adopt_weights)
            log.info(f"step 0: the weights of {self.seeded_from}, evaluated, not trained")
        groups = self.method.param_groups(model, info)
        opt = Optimisation.for_step(model, self.config.train, index, iterations, self.rt, groups)
        step = Step(
            info, loader, model, self.old_model, opt, epochs, memory=memory, iterations=iterations
        )
        if self.resume:
            self.restore_interrupted(step)
        step.net = self.rt.wrap(model)
        return step

    def step_memory(self, info: StepInfo) -> list[Exemplar]:
        """The exemplar memory of a step > 0 of a method with one: chosen once (rank 0, from the
        previous memory and the previous step's images, :mod:`incseg.engine.memory`) and kept in
        the run directory, where a resumed step finds it again; every rank reads it back checked."""
        size = self.method.memory_size
        if info.step == 0 or size == 0:
            return []
        previous = self.data.train_indices(step_info(self.setting, info.step - 1))
        rule = self.method.memory_rule
        earlier = tuple(
            self.data.train_indices(step_info(self.setting, s))
            for s in range(info.step - 1)
            if rule == "frequency"
        )
        memory = StepMemory(
            self.config, self.data.train, self.rt, info, self.memory, previous, size, earlier, rule
        )
        path = self.files.memory_file(info.step)
        if self.rt.dist.is_main and not (self.resume and path.is_file()):
            memory.write(path, memory.choose(self.method.memory_pseudo_labels, self.old_model))
        barrier(self.rt.dist)
        return memory.read(path)

    def restore_interrupted(self, step: Step) -> None:
        """After :meth:`start`, restore an interrupted step's weights (in place: the method's
        references stay valid), method state, optimiser and RNG, and its epoch history (left
        empty when the step was not interrupted, or by an older incseg)."""
        partial = self.files.interrupted_step(self.config, step.info.step)
        if partial is None or partial.get("epoch_format") != EPOCH_FORMAT:
            return
        step.model.load_state_dict(partial["model"])
        self.method.load_step_state_dict(partial["method_step"])
        step.opt.load_state_dict(partial)
        torch.set_rng_state(partial["torch_rng"])
        step.history = list(partial["history"])
        log.info(f"resuming step {step.info.step} after epoch {partial['epochs_done']}")

    def before_training(self, step: Step) -> None:
        """At a step > 0, the method's pass of the old model over the step's data
        (``scans_old_model``), then its ``prepare_step``; a resumed step restored their results
        (method step state, weights) instead."""
        if step.old_model is None or step.history:
            return
        if self.method.scans_old_model:
            scan_old_model(step, self.method, self.rt)
        data = StepData(step, self.rt, self.config.train)
        self.method.prepare_step(data, step.info, step.model, step.old_model)

    def epochs(self, step: Step) -> tqdm:
        """The epochs left to train in ``step``, with a progress bar."""
        return tqdm(
            range(len(step.history), step.epochs),
            desc=f"step {step.info.step}",
            unit="epoch",
            disable=not self.rt.progress,
        )

    def train_epoch(self, step: Step, epoch: int) -> None:
        """One epoch, MiB's validation when due (``train.val_interval``), the epoch's loss means
        in the history and scalars, and the resumable checkpoint when due."""
        train = self.config.train
        step.loader.batch_sampler.set_epoch(epoch)
        terms = train_one_epoch(
            step, self.method, self.rt, epoch, log_interval=train.log_interval, scalars=self.scalars
        )
        if train.val_interval and (epoch + 1) % train.val_interval == 0:
            terms["val_miou"] = self.validation_miou(step)
        step.history.append(terms)
        self.scalars.add(f"step_{step.info.step}/epoch", terms, epoch + 1)
        every, done = train.checkpoint_every, epoch + 1
        if self.rt.dist.is_main and every and (done % every == 0 or done == step.epochs):
            self.files.save_epoch(step.info.step, done, self.epoch_state(step))

    def epoch_state(self, step: Step) -> dict[str, Any]:
        """What an exact resume needs after an epoch besides the step's start: weights, what the
        method accumulated in the step, optimiser / LR / loss-scale state, the global RNG (the
        data order is a function of seed, step and epoch) and the epoch history."""
        return {
            "epoch_format": EPOCH_FORMAT,
            "config": self.config.to_dict(),
            "model": step.model.state_dict(),
            "method_step": self.method.step_state_dict(),
            **step.opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": list(step.history),
        }

    def validation_miou(self, step: Step) -> float:
        """MiB's validation during training: mean IoU of the current step's classes on test images
        with a current class, old classes ignored."""
        loader = self.data.test_loader(step.info, split="val")
        matrix = evaluate(
            step.model, loader, step.info.num_channels, replace(self.rt, progress=False)
        )
        step.model.train()
        matrix = matrix[:, : step.info.num_channels]  # an abstaining model's last column
        first_new = step.info.num_old_channels
        iou, present = iou_per_class(matrix)[first_new:], matrix.sum(1)[first_new:] > 0
        return float(iou[present].mean()) if bool(present.any()) else float("nan")

    def finish(self, step: Step) -> StepReport:
        """``end_step`` and ``after_training``; evaluate on all seen classes; record the step (checkpoint, metrics,
        scalars) and print its table; its model becomes the next step's old model."""
        info = step.info
        step.model.zero_grad(set_to_none=True)  # the last gradients: not the next step's to keep
        self.method.end_step(info, step.model)
        self.method.after_training(StepData(step, self.rt, self.config.train), info, step.model)
        test = self.data.test_loader(info)
        matrix = evaluate(step.model, test, info.num_channels, self.rt)
        report = StepReport.from_confusion(matrix, info)
        num_train = len(step.loader.dataset) - len(step.memory)  # either mixing holds them once
        entry = {
            **report.to_dict(),
            "num_train_images": num_train,
            "num_test_images": len(test.dataset),
            "losses": step.history,
        }
        if info.step == 0 and self.seeded_from is not None:
            entry["started_from"] = self.seeded_from
        names = dict(zip(info.order, info.class_names, strict=True))
        if step.memory:
            entry["memory"] = {
                "images": len(step.memory),
                "summary": memory_summary(step.memory, names),
            }
        self.metrics["steps"].append(entry)
        if self.rt.dist.is_main:
            payload = {
                "setting": self.config.protocol.setting,
                "channels_per_step": list(info.channels_per_step),
                "config": self.config.to_dict(),
                "model": step.model.state_dict(),
                "method": self.method.state_dict(),
                "confusion": matrix.cpu(),
                "memory": [e.to_dict() for e in step.memory],
                "metrics_entry": entry,  # metrics.json's entry, should that file be lost
            }
            self.files.save_step(info.step, payload, self.metrics)
        groups = {k: 100 * getattr(report, f"miou_{k}") for k in ("old", "new", "all", "with_bg")}
        self.scalars.add("miou", groups, info.step)
        title = self._step_title(info, f"{num_train} train / {len(test.dataset)} test images")
        if step.memory:
            title += f"; memory {memory_summary(step.memory, names)}"
        elif self.method.stores() != "nothing":
            title += f"; stores {self.method.stores()}"
        log.info(format_step_table(report, title))
        self.reports.append(report)
        self.model, self.old_model = step.model, frozen_copy(step.model)
        self.memory = step.memory
        return report

    def _step_title(self, info: StepInfo, images: str) -> str:
        """The step table's title: the step, the setting, the method and ``images``."""
        c = self.config
        return (
            f"Step {info.step} of {c.data.dataset} {c.setting.name} ({c.protocol.mode}, "
            f"{c.method.name}): {images}"
        )

    def summarise(self) -> None:
        """Log the summary over steps and write ``metrics.json`` and ``summary.md`` (rank 0); no
        rank returns before rank 0's files exist (``incseg compare`` reads them next)."""
        log.info(format_summary(self.reports))
        c = self.config
        heading = (
            f"{c.name}: {c.method.name} on {c.data.dataset} {self.setting.name} ({c.protocol.mode})"
        )
        published = summary_lines(c, self.reports[-1], self.setting.num_steps)
        if published:
            log.info("\n".join(line for line in published if line))
        if self.rt.dist.is_main:  # metrics again: a resume with no step left rebuilt them
            self.files.write_metrics(self.metrics)
            text = summary_markdown(self.reports, heading, c.to_yaml(), published)
            self.files.write_summary(text)
        barrier(self.rt.dist)
