"""What a step trains with (:class:`Step`, :class:`Optimisation`) and how: one epoch
(:func:`train_one_epoch`) and the pass of the old model before training (:func:`scan_old_model`)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from incseg.config import TrainConfig
from incseg.engine.distributed import all_reduce_mean, all_reduce_sum
from incseg.engine.faults import fault_point
from incseg.engine.runtime import Runtime
from incseg.engine.tensorboard import Scalars
from incseg.errors import IncsegError
from incseg.methods.base import Method
from incseg.protocol.steps import StepInfo


class NonFiniteLossError(IncsegError):
    """The loss became NaN or infinite; the message names step, epoch, iteration and terms."""


def poly_lr_lambda(
    total_iters: int,
    power: float,
    warmup: float = 0.0,
    floor: float = 0.0,
    decay_at: tuple[float, ...] = (),
):
    """Poly factor ``(1 - it / total)^power``, updated per iteration, in the closed form of the
    official ``PolyLR`` (fcdl94/MiB ``utils/scheduler.py:9-11``). ``torch.optim.lr_scheduler.
    PolynomialLR`` is not used: it updates the LR multiplicatively, step by step, and so differs
    from the closed form in the last bits (measured on the demo: 1,111 of 1,130 LRs, by up to
    1.9e-15 relative), which changes the trained weights. ``power`` 0 keeps the LR constant.

    ``warmup`` (a fraction of ``total_iters``): the factor is also multiplied by
    ``0.001 (1 - a) + a``, ``a = it / (warmup total)``, while ``it`` is below ``warmup total``
    (the linear ``WarmupPolyLR`` of clovaai/SSUL ``utils/scheduler.py:39-56, 78-85`` and
    cvlab-yonsei/DKD ``utils/lr_scheduler.py:32, 50-55, 77-84``). ``floor``: the factor never goes
    below it (SSUL's ``PolyLR`` clamps each LR at ``min_lr``, ``scheduler.py:15``).
    ``decay_at`` (fractions of ``total_iters``): from each, the factor is 10x smaller
    (detectron2's ``WarmupMultiStepLR``, gamma 0.1: ``bisect_right(milestones, it)``
    decays)."""
    warm = warmup * total_iters
    milestones = [d * total_iters for d in decay_at]

    def factor(it: int) -> float:
        value = max(0.0, 1.0 - it / max(total_iters, 1)) ** power
        value *= 0.1 ** sum(it >= m for m in milestones)
        if it < warm:
            alpha = it / warm
            value *= 0.001 * (1 - alpha) + alpha
        return max(value, floor)

    return factor


@dataclass
class Optimisation:
    """SGD (Nesterov momentum) or AdamW, the per-iteration poly LR, the fp16 loss scaler and the
    gradient clipping (``clip_grad_norm``, None: off) of one step, over ``clipped``: the
    optimiser's parameters in the model's order (:meth:`for_step`)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    clip_grad_norm: float | None = None
    clipped: list[nn.Parameter] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.clip_grad_norm is not None and not self.clipped:
            raise ValueError("clip_grad_norm needs the parameters to clip (Optimisation.for_step)")

    @classmethod
    def for_step(
        cls,
        model: nn.Module,
        train: TrainConfig,
        step: int,
        iterations: int,
        rt: Runtime,
        groups: list[dict[str, Any]] | None = None,
    ) -> Optimisation:
        """``iterations``: of the whole step (epochs x batches per epoch). ``groups``: the
        method's parameter groups (:meth:`incseg.methods.base.Method.param_groups`; None: every
        parameter at the step's LR)."""
        lr = train.lr_at(step)
        groups = [{"params": list(model.parameters())}] if groups is None else groups
        options = []
        for group in groups:
            group = dict(group)
            group["lr"] = lr * group.pop("lr_scale", 1.0)
            options.append(group)
        if train.optimizer == "adamw":  # a group's own weight_decay (0 for norms) wins
            optimizer = torch.optim.AdamW(options, lr=lr, weight_decay=train.weight_decay)
        else:
            optimizer = torch.optim.SGD(
                options,
                lr=lr,
                momentum=train.momentum,
                nesterov=train.nesterov and train.momentum > 0,
                weight_decay=train.weight_decay,
            )
        schedules = [
            poly_lr_lambda(
                iterations,
                train.lr_power,
                train.lr_warmup,
                train.lr_min / g["lr"] if g["lr"] > 0 else 0.0,
                train.lr_decay_at,
            )
            for g in optimizer.param_groups
        ]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
        fp16 = rt.amp_dtype == torch.float16
        scaler = torch.amp.GradScaler(rt.device.type, enabled=fp16)
        # Mask2Former's full-model clipping takes the optimiser's parameters (a frozen weight is
        # not among them: facebookresearch/Mask2Former train_net.py:241-245), listed in the
        # model's order as its per-parameter groups are (the order of the norm's float sum)
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        clipped = [p for p in model.parameters() if id(p) in trained]
        return cls(optimizer, scheduler, scaler, train.clip_grad_norm, clipped)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


@dataclass
class Step:
    """What lives for one step of a run: made by :meth:`incseg.engine.run.Run.start`, trained
    epoch by epoch, closed by :meth:`~incseg.engine.run.Run.finish`.

    Attributes:
        info: the step (classes, channels).
        loader: its training batches (``(images, targets)``; a ``DataLoader`` whose
            ``batch_sampler`` has ``set_epoch``, or any iterable of batches in tests).
        model: the model being trained (the hooks always see this bare module).
        old_model: the frozen model of the previous step (None at step 0); it runs on every
            batch only for a method that ``needs_old_model``.
        opt: optimiser, LR schedule and loss scaler of the step.
        epochs: epochs the step trains.
        net: what runs the training forward pass when it is not ``model`` itself: its DDP and/or
            ``torch.compile`` wrapper (None: ``model``).
        history: the epoch means of the loss terms so far (restored on resume).
        memory: the step's exemplar memory (:class:`incseg.protocol.memory.Exemplar`), empty
            without one.
        iterations: iterations the step trains in all (None: ``epochs`` full passes); the last
            epoch stops when they are done.
    """

    info: StepInfo
    loader: Any
    model: nn.Module
    old_model: nn.Module | None
    opt: Optimisation
    epochs: int = 1
    net: nn.Module | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    memory: list[Any] = field(default_factory=list)
    iterations: int | None = None

    def batches_in(self, epoch: int) -> int:
        """Batches epoch ``epoch`` (0-based) trains: all of the loader's, but fewer in the last
        epoch of a step counted in iterations."""
        full = len(self.loader)
        if self.iterations is None:
            return full
        return max(0, min(full, self.iterations - epoch * full))


@dataclass
class StepData:
    """A step's training batches and optimiser settings as a method's ``prepare_step`` sees them
    (the protocol :class:`incseg.methods.base.StepData`)."""

    step: Step
    rt: Runtime
    train: TrainConfig

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @property
    def batches_per_epoch(self) -> int:
        return len(self.step.loader)

    @property
    def epochs(self) -> int:
        return self.step.epochs

    @property
    def sgd_settings(self) -> dict[str, Any]:
        train = self.train
        return {
            "lr": train.lr_at(self.step.info.step),
            "momentum": train.momentum,
            "nesterov": train.nesterov and train.momentum > 0,
            "weight_decay": train.weight_decay,
            "lr_power": train.lr_power,
        }

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.step.loader.batch_sampler.set_epoch(epoch)
        for images, targets in self.step.loader:
            images = images.to(
                self.rt.device, non_blocking=True, memory_format=self.rt.memory_format
            )
            yield images, targets.to(self.rt.device, non_blocking=True)

    def autocast(self) -> AbstractContextManager:
        return self.rt.autocast()

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor, self.rt.dist)

    def mean_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_mean(tensor, self.rt.dist)


def train_one_epoch(
    step: Step,
    method: Method,
    rt: Runtime,
    epoch: int,
    *,
    log_interval: int = 10,
    scalars: Scalars | None = None,
) -> dict[str, float]:
    """Train ``step.model`` for one pass over ``step.loader``; return the mean of each loss term.

    Loss values are read back to the host only every ``log_interval`` iterations, to avoid a
    device sync per batch; then ``scalars`` gets this rank's terms, the total and the LR under
    ``step_K/train`` (the x axis counts iterations from 1 within the step). The returned epoch
    means are averaged over all ranks.
    """
    step.model.train()
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=rt.device))
    desc = f"step {step.info.step} epoch {epoch + 1}"
    count = step.batches_in(epoch)
    bar = tqdm(step.loader, desc=desc, leave=False, disable=not rt.progress, total=count)
    for it, (images, targets) in enumerate(bar):
        loss, terms = train_batch(step, method, rt, images, targets)
        fault_point(f"iteration:{step.info.step}:{epoch}:{it + 1}")
        for name, value in terms.items():
            sums[name] += value.detach().float()
        if (it + 1) % log_interval == 0 or it + 1 == count:
            _check_and_log(loss, terms, step, (epoch, it, len(step.loader)), bar, scalars)
        if it + 1 == count:  # the step's last iteration (iterations counted): the rest unused
            break
    # Epoch means over all ranks' batches (one reduction per epoch), as one process would log.
    names = sorted(sums)
    if not names:
        return {}
    num_batches = max(count, 1)
    means = all_reduce_mean(torch.stack([sums[n] for n in names]) / num_batches, rt.dist)
    return {name: float(mean) for name, mean in zip(names, means, strict=True)}


def train_batch(
    step: Step, method: Method, rt: Runtime, images: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One iteration: old model, relabel, student, losses, backward, optimizer and LR step.
    Returns the total loss and its named terms (on the device, not read back)."""
    images = images.to(rt.device, non_blocking=True, memory_format=rt.memory_format)
    targets = targets.to(rt.device, non_blocking=True)
    opt = step.opt
    # Free the previous iteration's gradients before the forwards, not after: kept alive, they
    # (one copy of every parameter) add to the activation peak (docs/benchmarks.md). The
    # official code also clears them before the student's forward (fcdl94/MiB train.py:98).
    opt.optimizer.zero_grad(set_to_none=True)
    with rt.autocast():
        # The old model runs first, as in the official code (train.py:94-99): its transient
        # activations then never coexist with the student's graph, only its outputs do.
        old_output = None
        if step.old_model is not None and method.needs_old_model:
            with torch.no_grad():
                old_output = step.old_model(images, features=method.features)
        targets = method.relabel(old_output, targets, step.info)
        output = (step.net or step.model)(images, features=method.features)
        terms = method.losses(output, old_output, targets, step.info)
        loss = sum(terms.values())
    # What the losses need is saved in the graph; dropping these references lets backward
    # free the full-resolution logits as soon as it has used them.
    del output, old_output
    opt.scaler.scale(loss).backward()
    if method.needs_gradients or opt.clip_grad_norm is not None:
        opt.scaler.unscale_(opt.optimizer)  # importance estimates and clipping: true gradients
    if method.needs_gradients:
        method.after_backward(step.model)
    if opt.clip_grad_norm is not None:  # the trained parameters' gradients as one vector
        torch.nn.utils.clip_grad_norm_(opt.clipped, opt.clip_grad_norm)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    return loss, terms


def _check_and_log(loss, terms, step: Step, at: tuple[int, int, int], bar, scalars) -> None:
    """Read the loss back (a device sync): stop on a non-finite value, else show and log it.
    ``at``: (epoch, iteration) 0-based and the batches per epoch."""
    value = float(loss.detach())
    if not math.isfinite(value):
        detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        raise NonFiniteLossError(
            f"non-finite loss at step {step.info.step}, epoch {at[0] + 1}, iteration {at[1] + 1}: "
            f"loss={value} ({detail})"
        )
    lr = step.opt.scheduler.get_last_lr()[0]
    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
    if scalars is not None and scalars.enabled:
        values = {name: float(v.detach()) for name, v in terms.items()}
        x = at[0] * at[2] + at[1] + 1  # iterations from 1 within the step
        scalars.add(f"step_{step.info.step}/train", {**values, "total": value, "lr": lr}, x)


@torch.no_grad()
def scan_old_model(step: Step, method: Method, rt: Runtime) -> None:
    """The pass before a step's training (``Method.scans_old_model``): the frozen old model over
    the step's training batches in epoch 0's order and augmentation; ``method.scan``'s statistics
    are summed over batches and then over processes (the total one process would get; PLOP and
    cssegmentation keep each process's own, ``train.py:505-589``), then ``method.end_scan``."""
    step.loader.batch_sampler.set_epoch(0)
    totals: dict[str, torch.Tensor] = {}
    bar = tqdm(
        step.loader, desc=f"step {step.info.step} scan", leave=False, disable=not rt.progress
    )
    for index, (images, targets) in enumerate(bar):
        fault_point(f"scan:{step.info.step}:{index}")
        images = images.to(rt.device, non_blocking=True, memory_format=rt.memory_format)
        targets = targets.to(rt.device, non_blocking=True)
        with rt.autocast():
            old_output = step.old_model(images, features=method.features)
        for name, value in method.scan(old_output, targets, step.info).items():
            totals[name] = totals[name] + value if name in totals else value.clone()
    totals = {name: all_reduce_sum(value, rt.dist) for name, value in totals.items()}
    method.end_scan(totals, step.info)
