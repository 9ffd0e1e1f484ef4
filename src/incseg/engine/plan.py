"""A run's plan, before any training: every step's classes, images, epochs and iterations, the
checks a step's training set must pass, and what the run's cost is proportional to
(``incseg run --dry-run``; :func:`check_plan` runs the checks at the start of every run)."""

from __future__ import annotations

from dataclasses import dataclass

from incseg.config import Config
from incseg.engine.loaders import Sources
from incseg.errors import DataError, IncsegError
from incseg.methods.base import Method
from incseg.protocol import get_setting, step_info


@dataclass(frozen=True)
class StepPlan:
    """One step of the plan. ``images_per_epoch``: training images the student sees per epoch
    (full batches; a set smaller than the batch is one batch). ``problem``: why the step cannot
    train (None: it can)."""

    step: int
    new_classes: tuple[str, ...]
    num_train: int
    num_test: int
    epochs: int
    batches_per_epoch: int
    images_per_epoch: int
    problem: str | None = None

    @property
    def iterations(self) -> int:
        return self.epochs * self.batches_per_epoch


def plan_steps(config: Config, data: Sources, first: int = 0) -> list[StepPlan]:
    """The plan of steps ``first..`` of ``config``'s run on ``data``: the same selection and the
    same loaders the run builds (cheap: the class index is cached), no model, nothing written."""
    setting = get_setting(config.family, config.protocol.setting)
    plans = []
    for index in range(first, config.num_steps):
        info = step_info(setting, index)
        names = tuple(info.class_names[info.num_old_channels :])
        epochs = config.train.epochs_at(index)
        num_test = 0
        try:
            num_test = len(data.test_loader(info).dataset)
            loader = data.train_loader(info)
        except DataError as err:
            plans.append(StepPlan(index, names, 0, num_test, epochs, 0, 0, problem=str(err)))
            continue
        num_train, batches = len(loader.dataset), len(loader)
        per_epoch = batches * min(config.train.batch_size, num_train)
        plans.append(StepPlan(index, names, num_train, num_test, epochs, batches, per_epoch))
    return plans


def check_plan(plans: list[StepPlan]) -> None:
    """Stop before any training when a step cannot train, naming every such step.

    Raises:
        DataError: one line per failing step.
    """
    problems = [p.problem for p in plans if p.problem is not None]
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"{len(problems)} steps cannot train:\n  " + "\n  ".join(problems))


def format_plan(config: Config, plans: list[StepPlan], method: Method) -> str:
    """The table ``incseg run --dry-run`` prints, with the image passes the run's cost is
    proportional to: forward+backward passes of the student, forward passes of the old model
    (every batch with ``needs_old_model``, one more epoch with ``scans_old_model``, steps > 0),
    those of ``prepare_step`` (``Method.prepare_passes``)
    and evaluation forwards (the test set after each step)."""
    c = config
    title = (
        f"Plan of {c.name}: {c.method.name} on {c.data.dataset} {c.protocol.setting} ({c.protocol.mode}), "
        f"{c.model.backbone}, crop {c.data.crop_size}, global batch {c.train.batch_size}"
    )
    lines = [
        title,
        f"{'step':>4}  {'train':>6}  {'test':>5}  {'epochs':>6}  {'iters':>7}  new classes",
    ]
    student = old = evaluated = 0
    for p in plans:
        shown = ", ".join(p.new_classes[:6]) + (
            f", ... ({len(p.new_classes)})" if len(p.new_classes) > 6 else ""
        )
        lines.append(
            f"{p.step:>4}  {p.num_train:>6}  {p.num_test:>5}  {p.epochs:>6}  {p.iterations:>7}  {shown}"
        )
        if p.problem is not None:
            lines.append(f"      cannot train: {p.problem}")
            continue
        student += p.epochs * p.images_per_epoch
        if p.step > 0:
            old += p.epochs * p.images_per_epoch if method.needs_old_model else 0
            old += p.images_per_epoch if method.scans_old_model else 0
            extra_student, extra_old = method.prepare_passes()
            student += extra_student * p.images_per_epoch
            old += extra_old * p.images_per_epoch
        evaluated += p.num_test
    lines.append(
        f"image passes: {student:,} student forward+backward, {old:,} old-model forward, "
        f"{evaluated:,} evaluation forward (validation during training not counted)"
    )
    size = method.memory_size
    if size:
        if method.memory_mixing == "concat":
            how = f"joining each step's training images (about {size // c.train.batch_size} more iterations per epoch)"
        else:
            how = "filling half of every batch (no more iterations)"
        lines.append(
            f"memory: {size} images from step 1 on, {how}; chosen at each step's start from one pass "
            "over the previous step's training images (not counted above)"
        )
    failing = [p.step for p in plans if p.problem is not None]
    lines.append(
        f"checks: {'every step can train' if not failing else f'steps {failing} cannot train'}"
    )
    return "\n".join(lines)


def dry_run(config: Config, progress: bool = False) -> str:
    """What ``incseg run --dry-run`` prints; nothing is trained or written.

    Raises:
        IncsegError: the data cannot be read (message names the file), or a step cannot train
            (after the plan is printed by the caller).
    """
    data = Sources.load(config, progress=progress)
    plans = plan_steps(config, data)
    text = format_plan(config, plans, config.method.build())
    failing = [p for p in plans if p.problem is not None]
    if failing:
        raise PlanError(text, f"{len(failing)} step(s) cannot train: see the plan above")
    return text


class PlanError(IncsegError):
    """A plan with failing steps: ``plan`` is the table to print before the error line."""

    def __init__(self, plan: str, message: str) -> None:
        super().__init__(message)
        self.plan = plan
