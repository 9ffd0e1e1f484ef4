"""The collectives a method's loss needs under torchrun (one process: the identity).

The hooks that see a step's batches get the engine's ``StepData`` for this; ``losses`` runs in
the iteration and reaches the default process group, which the engine starts under torchrun
(:mod:`incseg.engine.distributed`), directly. Every process must make the same calls in the same
order.
"""

from __future__ import annotations

import torch


def world() -> tuple[int, int]:
    """(rank, number of processes) of the running process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def reduce_over_processes(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` summed (``op="sum"``) or minimised (``"min"``) over every process, in place;
    returns it."""
    if world()[1] > 1:
        reduce_op = (
            torch.distributed.ReduceOp.MIN if op == "min" else torch.distributed.ReduceOp.SUM
        )
        torch.distributed.all_reduce(tensor, op=reduce_op)
    return tensor


def gather_rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``(N_r, ...)`` rows (N_r may differ), in rank order; no gradient."""
    _, size = world()
    if size == 1:
        return [tensor.detach()]
    sizes = [torch.zeros((), dtype=torch.long, device=tensor.device) for _ in range(size)]
    torch.distributed.all_gather(sizes, torch.tensor(tensor.shape[0], device=tensor.device))
    largest = max(int(n) for n in sizes)
    padded = tensor.detach().new_zeros((largest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    parts = [torch.empty_like(padded) for _ in range(size)]
    torch.distributed.all_gather(parts, padded)
    return [part[: int(n)] for part, n in zip(parts, sizes, strict=True)]
