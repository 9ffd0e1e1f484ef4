"""One epoch of training."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from incseg.engine.distributed import all_reduce_mean
from incseg.engine.faults import fault_point
from incseg.errors import IncsegError
from incseg.methods import Method
from incseg.protocol.steps import StepInfo


class NonFiniteLossError(IncsegError):
    """The loss became NaN or infinite; the message names step, epoch, iteration and terms."""


def poly_lr_lambda(total_iters: int, power: float):
    """Poly schedule factor ``(1 - it / total)^power``, updated per iteration."""
    return lambda it: max(0.0, 1.0 - it / max(total_iters, 1)) ** power


def train_one_epoch(
    model: nn.Module,
    old_model: nn.Module | None,
    method: Method,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    info: StepInfo,
    *,
    epoch: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    log_interval: int,
    progress: bool,
    net: nn.Module | None = None,
    channels_last: bool = False,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` for one pass over ``loader``; return the mean of each loss term.

    ``net`` is what runs the forward pass when it is not ``model`` itself: its DDP and/or
    ``torch.compile`` wrapper (the method's hooks always see the bare ``model``). ``old_model``
    (frozen, eval mode) runs under ``no_grad`` inside the same autocast as the student; it is only
    given when the method needs it. Loss values are read back to the host only every
    ``log_interval`` iterations, to avoid a device sync per batch; then ``on_log(iteration,
    values)`` gets this rank's terms, the total and the LR (``iteration`` counts from 1 within
    the step). The returned epoch means are averaged over all ranks.
    """
    net = model if net is None else net
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.train()
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    bar = tqdm(loader, desc=f"step {info.step} epoch {epoch + 1}", leave=False, disable=not progress)
    for it, (images, targets) in enumerate(bar):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        # Free the previous iteration's gradients before the forwards, not after: kept alive, they
        # (one copy of every parameter) add to the activation peak (docs/benchmarks.md). The
        # official code also clears them before the student's forward (fcdl94/MiB train.py:98).
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            # The old model runs first, as in the official code (train.py:94-99): its transient
            # activations then never coexist with the student's graph, only its outputs do.
            old_output = None
            if old_model is not None:
                with torch.no_grad():
                    old_output = old_model(images, return_features=method.needs_features)
            output = net(images, return_features=method.needs_features)
            terms = method.losses(output, old_output, targets, info)
            loss = sum(terms.values())
        # What the losses need is saved in the graph; dropping these references lets backward
        # free the full-resolution logits as soon as it has used them.
        del output, old_output
        scaler.scale(loss).backward()
        if method.needs_gradients:
            scaler.unscale_(optimizer)  # importance estimates need the true gradients
            method.after_backward(model)
        scaler.step(optimizer)
        scaler.update()
        if method.needs_gradients:
            method.after_update(model)
        scheduler.step()
        fault_point(f"iteration:{info.step}:{epoch}:{it + 1}")
        for name, value in terms.items():
            sums[name] += value.detach().float()
        if (it + 1) % log_interval == 0 or it + 1 == len(loader):
            value = float(loss.detach())
            if not math.isfinite(value):
                detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
                raise NonFiniteLossError(
                    f"non-finite loss at step {info.step}, epoch {epoch + 1}, iteration {it + 1}: "
                    f"loss={value} ({detail})"
                )
            lr = scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            if on_log is not None:
                values = {name: float(v.detach()) for name, v in terms.items()}
                on_log(epoch * len(loader) + it + 1, {**values, "total": value, "lr": lr})
    # Epoch means over all ranks' batches (one reduction per epoch), as one process would log.
    names = sorted(sums)
    means = all_reduce_mean(torch.stack([sums[n] for n in names]) / max(len(loader), 1)) if names else []
    return {name: float(mean) for name, mean in zip(names, means, strict=True)}
