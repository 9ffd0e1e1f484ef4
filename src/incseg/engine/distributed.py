"""Multi-process training launched by ``torchrun``: process group, batch-norm sync, sharding.

``torchrun --nproc_per_node=N -m incseg run CONFIG`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`init_distributed` joins them (NCCL on CUDA, gloo on
the CPU). A single process (no ``WORLD_SIZE`` or 1) needs no process group, and every helper here
is then the identity, so the one-process path runs the same code.

Conventions: ``train.batch_size`` is the global batch; each rank takes ``batch_size / N``
consecutive images of every global batch (:class:`EpochBatchSampler`), so N ranks see exactly
the images, in the same order and with the same augmentation seeds, as one process.

Process identity has one source: the :class:`DistInfo` that :func:`init_distributed` returns, passed
explicitly to everything that needs it (the collectives below take it too).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from incseg.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``; ``is_main`` writes files and logs."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = DistInfo()  # one process


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={value!r}: expected an integer (set by torchrun)"
        ) from None


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (no-op for one process).

    Returns:
        This process's :class:`DistInfo`. On CUDA, ``device`` should be ``cuda:LOCAL_RANK``
        (see :func:`local_device`).
    """
    info = DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1))
    if info.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)
    return info


def local_device(device: torch.device) -> torch.device:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` so that each process of a node drives its own GPU."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return device


def _group_joined() -> bool:
    """A process group of more than one process is joined (for the batch-norm module, which
    cannot be handed a :class:`DistInfo`)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(value, info: DistInfo):
    """Rank 0's ``value`` on every rank (identity for one process), e.g. a generated run name."""
    if info.distributed:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (identity for one process); returns it."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks, in place (identity for one process); returns it."""
    return all_reduce_sum(tensor, info).div_(info.world_size) if info.distributed else tensor


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Images per rank; the global batch must split evenly (a config error names both numbers)."""
    if global_batch % world_size:
        raise ConfigError(
            f"train.batch_size: {global_batch} is the global batch and must be divisible by the "
            f"number of processes ({world_size})"
        )
    return global_batch // world_size


class EpochBatchSampler:
    """Batches of ``(index, seed)`` keys for one rank; the order depends only on ``seed`` and the epoch.

    Each epoch draws one permutation of ``range(n)`` and one augmentation seed per position from
    ``torch.Generator().manual_seed(seed * 100003 + epoch)``; global batches of ``batch_size``
    are cut from it (the last incomplete one dropped when ``n >= batch_size``), and rank ``r``
    yields its ``batch_size / world_size`` slice of each. Being a function of (seed, epoch), it
    needs no state saved for an exact resume: :meth:`set_epoch` is enough.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Global batches per epoch (the same on every rank)."""
        return self.n // self.batch_size if self.n >= self.batch_size else int(self.n > 0)

    def global_batches(self) -> Iterator[list[tuple[int, int]]]:
        """The epoch's global batches of ``(index, seed)`` keys, before they are split."""
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        seeds = torch.randint(0, 2**62, (self.n,), generator=generator).tolist()
        size = min(self.batch_size, self.n)
        for start in range(0, len(self) * size, size):
            yield [(order[i], seeds[i]) for i in range(start, start + size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.global_batches():
            # A short epoch (n < batch) splits its only batch as evenly as it can.
            bounds = [len(batch) * r // self.world_size for r in range(self.world_size + 1)]
            yield batch[bounds[self.rank] : bounds[self.rank + 1]]


class HalfMemorySampler(EpochBatchSampler):
    """:class:`EpochBatchSampler` over ``n`` training images whose every global batch has half
    its places (drawn at random) taken by memory images, keys ``n + j`` for memory image ``j``:
    SSUL's mixing (clovaai/SSUL ``main.py:429-443``: a batch from the memory's own shuffled
    loader, then ``randperm(B)[:B // 2]`` of the batch's places overwritten by it).

    The memory's list is doubled until it fills a batch (SSUL ``datasets/voc.py:88-89``) and
    drawn in shuffled batches (the last incomplete one dropped), a new shuffle when it runs out.
    Every draw comes from a generator seeded by ``seed`` and the epoch, apart from the training
    order's, so an epoch is again a function of (seed, epoch). Where SSUL's memory loader
    carries its position over from one epoch to the next, here each epoch starts a new shuffle.
    """

    def __init__(
        self, n: int, n_memory: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__(n, batch_size, seed, rank, world_size)
        self.n_memory = n_memory

    def global_batches(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed((self.seed * 100003 + self.epoch) * 7 + 3)
        pool = list(range(self.n_memory))
        while pool and len(pool) < self.batch_size:
            pool = pool * 2
        queue: list[tuple[int, int]] = []
        for batch in super().global_batches():
            size = len(batch)
            if not pool:
                yield batch
                continue
            if len(queue) < size:  # a new shuffle of the memory, cut into whole batches
                order = torch.randperm(len(pool), generator=generator).tolist()
                seeds = torch.randint(0, 2**62, (len(pool),), generator=generator).tolist()
                whole = len(pool) // size * size
                queue = [(self.n + pool[order[i]], seeds[i]) for i in range(whole)]
            memory, queue = queue[:size], queue[size:]
            places = torch.randperm(size, generator=generator)[: size // 2].tolist()
            for place in places:
                batch[place] = memory[place]
            yield batch


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Evaluation images of one rank: ``rank, rank + N, ...``. Unlike ``DistributedSampler`` no
    image is repeated to even out the shards, so a reduced confusion matrix counts each once."""
    return range(rank, n, world_size)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is again the sum over ranks of the incoming gradients (every
    rank's loss depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole global batch, on any device.

    ``torch.nn.SyncBatchNorm`` runs on CUDA only; this one computes per-rank sums, reduces them
    with a differentiable all-reduce (so gradients flow through the shared statistics as well),
    and normalises with the global mean and biased variance; running statistics use the unbiased
    variance like ``nn.BatchNorm2d``. With one process or in eval mode it is ``nn.BatchNorm2d``.
    Input ``(B, C, H, W)`` float.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _group_joined()):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        # float64 sums: E[x^2] - E[x]^2 loses digits in float32 over millions of pixels.
        count = torch.full((1,), xf.numel() // c, dtype=torch.float64, device=xf.device)
        stats = torch.cat(
            [
                xf.sum((0, 2, 3), dtype=torch.float64),
                (xf * xf).sum((0, 2, 3), dtype=torch.float64),
                count,
            ]
        )
        stats = _AllReduceSum.apply(stats)
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c : 2 * c] / total - mean * mean).clamp(min=0)
        if self.track_running_stats:
            self._update_running_stats(mean, var, total)
        mean, var = mean.float(), var.float()
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            shift = self.bias - mean * scale * self.weight
            scale = scale * self.weight
        else:
            shift = -mean * scale
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(
        self, mean: torch.Tensor, var: torch.Tensor, total: torch.Tensor
    ) -> None:
        self.num_batches_tracked += 1
        momentum = (
            self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        )
        unbiased = var * (total / (total - 1).clamp(min=1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``model`` with a synchronised one, in place; weights and
    running statistics are kept (state-dict keys unchanged). CUDA uses ``nn.SyncBatchNorm``
    (fused kernels); other devices :class:`DistributedBatchNorm2d`."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = DistributedBatchNorm2d(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            ).to(device)
            sync.load_state_dict(child.state_dict())
            if child.affine:
                sync.weight, sync.bias = child.weight, child.bias
            setattr(model, name, sync)
        else:
            convert_sync_bn(child, device)
    return model
