"""One epoch of training."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn
from tqdm import tqdm

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
) -> dict[str, float]:
    """Train ``model`` for one pass over ``loader``; return the mean of each loss term.

    ``old_model`` (frozen, eval mode) runs under ``no_grad`` inside the same autocast as the
    student; it is only given when the method needs it. Loss values are read back to the host
    only every ``log_interval`` iterations, to avoid a device sync per batch.
    """
    model.train()
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    bar = tqdm(loader, desc=f"step {info.step} epoch {epoch + 1}", leave=False, disable=not progress)
    for it, (images, targets) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            output = model(images, return_features=method.needs_features)
            old_output = None
            if old_model is not None:
                with torch.no_grad():
                    old_output = old_model(images, return_features=method.needs_features)
            terms = method.losses(output, old_output, targets, info)
            loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
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
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    count = max(len(loader), 1)
    return {name: float(total) / count for name, total in sums.items()}
