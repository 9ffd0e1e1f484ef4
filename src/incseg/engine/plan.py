"""A run's plan, before any training: every step's classes, images, epochs and iterations, the
checks a run must pass before it trains, and what the run's cost is proportional to
(``incseg run --dry-run``; :func:`check_can_train` runs the checks at the start of every run and
of every dry run, so that the two refuse alike)."""

from __future__ import annotations

from dataclasses import dataclass

from incseg.config import Config
from incseg.engine.loaders import Sources, TooFewImages
from incseg.errors import DataError, IncsegError
from incseg.methods.base import Method
from incseg.protocol import StepInfo, step_info


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
    iterations: int = 0
    problem: str | None = None

    @property
    def images_per_iteration(self) -> int:
        return self.images_per_epoch // max(self.batches_per_epoch, 1)


def plan_steps(config: Config, data: Sources, first: int = 0) -> list[StepPlan]:
    """The plan of steps ``first..`` of ``config``'s run on ``data``: the same selection and the
    same loaders the run builds (cheap: the class index is cached), no model, nothing written."""
    setting = config.setting
    return [
        _plan_step(config, data, step_info(setting, index))
        for index in range(first, config.num_steps)
    ]


def _plan_step(config: Config, data: Sources, info: StepInfo) -> StepPlan:
    names = tuple(info.class_names[info.num_old_channels :])
    epochs = config.train.epochs_at(info.step)
    num_test = 0
    try:
        num_test = len(data.test_loader(info).dataset)
        loader = data.train_loader(info)
    except DataError as err:
        # The count the refusal names (none when nothing was selected): table and message agree.
        num_train = err.num_images if isinstance(err, TooFewImages) else 0
        return StepPlan(info.step, names, num_train, num_test, epochs, 0, 0, problem=str(err))
    num_train, batches = len(loader.dataset), len(loader)
    per_epoch = batches * min(config.train.batch_size, num_train)
    epochs, iterations = config.train.schedule_at(info.step, batches)
    return StepPlan(info.step, names, num_train, num_test, epochs, batches, per_epoch, iterations)


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


def check_can_train(config: Config, data: Sources, method: Method, plans: list[StepPlan]) -> None:
    """Every check a run passes before anything is trained or written, the same for ``incseg
    run`` (:meth:`incseg.engine.run.Run.open`) and ``incseg run --dry-run`` (:func:`dry_run`):
    every planned step can train (:func:`check_plan`; ``plans``: the steps still to train), the
    exemplar memory is no larger than step 0's training images, among which step 1 chooses it
    (docs/methods.md, "Exemplar memory"), and a method that takes the unknown class from saliency
    maps finds the map of every training image of the planned steps.

    Raises:
        DataError: the first check that fails, with the message the run stops with.
    """
    check_plan(plans)
    size = method.memory_size
    setting = config.setting
    if size and config.num_steps > 1:
        first = len(data.train_indices(step_info(setting, 0)))
        if size > first:
            raise DataError(
                f"method.memory_size {size}: more than the {first} training images of step 0, "
                "among which step 1 chooses its memory; lower it"
            )
    if method.unknown_from == "saliency":  # a missing map stops the run now, not steps later
        for plan in plans:
            data.train.check_saliency(data.train_indices(step_info(setting, plan.step)))


def format_plan(
    config: Config, plans: list[StepPlan], method: Method, refusal: str | None = None
) -> str:
    """The table ``incseg run --dry-run`` prints: each step's row (:class:`StepPlan`), the image
    passes the run's cost is proportional to (:func:`image_passes`), the exemplar memory, and the
    checks (``refusal``: why :func:`check_can_train` stops the run, None when it does not)."""
    c = config
    title = (
        f"Plan of {c.name}: {c.method.name} on {c.data.dataset} {c.setting.name} ({c.protocol.mode}), "
        f"{c.model.backbone}, crop {c.data.crop_size}, global batch {c.train.batch_size}"
    )
    lines = [
        title,
        f"{'step':>4}  {'train':>6}  {'test':>5}  {'epochs':>6}  {'iters':>7}  new classes",
    ]
    for p in plans:
        shown = ", ".join(p.new_classes[:6]) + (
            f", ... ({len(p.new_classes)})" if len(p.new_classes) > 6 else ""
        )
        lines.append(
            f"{p.step:>4}  {p.num_train:>6}  {p.num_test:>5}  {p.epochs:>6}  {p.iterations:>7}  {shown}"
        )
        if p.problem is not None:
            lines.append(f"      cannot train: {p.problem}")
    student, old, evaluated = image_passes(plans, method)
    lines.append(
        f"image passes: {student:,} student forward+backward, {old:,} old-model forward, "
        f"{evaluated:,} evaluation forward (validation during training not counted)"
    )
    lines += _memory_lines(config, method)
    lines.append(_checks_line(plans, refusal))
    return "\n".join(lines)


def image_passes(plans: list[StepPlan], method: Method) -> tuple[int, int, int]:
    """Image passes of the steps that can train: forward+backward passes of the student, forward
    passes of the old model (every batch with ``needs_old_model``, one more epoch with
    ``scans_old_model``, steps > 0), those of ``prepare_step`` (``Method.prepare_passes``) and
    evaluation forwards (the test set after each step)."""
    student = old = evaluated = 0
    for p in plans:
        if p.problem is not None:
            continue
        student += p.iterations * p.images_per_iteration
        if p.step > 0:
            old += p.iterations * p.images_per_iteration if method.needs_old_model else 0
            old += p.images_per_epoch if method.scans_old_model else 0
            extra_student, extra_old = method.prepare_passes()
            student += extra_student * p.images_per_epoch
            old += extra_old * p.images_per_epoch
        evaluated += p.num_test
    return student, old, evaluated


def _memory_lines(config: Config, method: Method) -> list[str]:
    size = method.memory_size
    if not size:
        return []
    if method.memory_mixing == "concat":
        how = f"joining each step's training images (about {size // config.train.batch_size} more iterations per epoch)"
    else:
        how = "filling half of every batch (no more iterations)"
    if method.memory_rule == "frequency":
        chosen = "chosen at each step's start from the labels' class index (no image pass)"
    else:
        chosen = (
            "chosen at each step's start from one pass over the previous step's training "
            "images (not counted above)"
        )
    return [f"memory: {size} images from step 1 on, {how}; {chosen}"]


def _checks_line(plans: list[StepPlan], refusal: str | None) -> str:
    failing = [p.step for p in plans if p.problem is not None]
    if failing:
        return f"checks: steps {failing} cannot train"
    if refusal is not None:
        return f"checks: the run stops before training: {refusal}"
    return "checks: every step can train"


def dry_run(config: Config, progress: bool = False) -> str:
    """What ``incseg run --dry-run`` prints; nothing is trained or written.

    Raises:
        IncsegError: the data cannot be read (message names the file).
        PlanError: :func:`check_can_train` stops the run; its message is the run's.
    """
    data = Sources.load(config, progress=progress)
    method = config.method.build()
    plans = plan_steps(config, data)
    try:
        check_can_train(config, data, method, plans)
    except DataError as err:
        raise PlanError(format_plan(config, plans, method, str(err)), str(err)) from None
    return format_plan(config, plans, method)


class PlanError(IncsegError):
    """A run that :func:`check_can_train` stops: ``plan`` is the table to print before the error
    line, which is the run's."""

    def __init__(self, plan: str, message: str) -> None:
        super().__init__(message)
        self.plan = plan
