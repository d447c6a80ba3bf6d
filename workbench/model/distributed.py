"""Data-parallel training under ``torchrun``: process group, batch sharding, reductions.

One process per device. ``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; without them (a
plain ``workbench train``) everything here is a no-op for a world of one, so the fit loop has
a single code path. Each rank takes a contiguous share of every global batch of the
deterministic epoch order, gradients are averaged by DistributedDataParallel and BatchNorm
statistics are computed over the global batch, so N processes follow the trajectory of one
process with the same ``--batch-size`` (up to float rounding).

Single node, 2 processes::

    torchrun --nproc_per_node=2 -m workbench.cli train --cohort demo --name m

Two nodes (run on each, with HOST:PORT reachable from both)::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 -m workbench.cli train --cohort demo --name m
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from workbench.config import environment_value

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``size`` processes and its device."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, bundles and database rows; the others only compute."""
        return self.rank == 0


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group that ``torchrun`` describes (env RANK, WORLD_SIZE, LOCAL_RANK).

    nccl on CUDA (one GPU per local rank), gloo on the CPU. Returns the world and the device
    this rank computes on. Without torchrun's variables: a world of one, ``device`` unchanged.
    """
    size = int(environment_value("WORLD_SIZE") or "1")
    if size <= 1:
        return World(), device
    rank = int(environment_value("RANK") or "0")
    local_rank = int(environment_value("LOCAL_RANK") or "0")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(minutes=30),  # rank 0 calibrates and bundles while others wait
            device_id=device if device.type == "cuda" else None,
        )
    return World(rank, size, local_rank), device


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: list[int], world: World) -> list[int]:
    """This rank's contiguous share of a global batch: sizes differ by at most one."""
    n = len(batch)
    return batch[world.rank * n // world.size : (world.rank + 1) * n // world.size]


def all_sum(x: torch.Tensor, world: World) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left alone). Identity for a world of one."""
    if not world.distributed:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast(obj: T, world: World) -> T:
    """Rank 0's ``obj`` on every rank (pickled: only for small, trusted values)."""
    if not world.distributed:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: T, world: World) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


class _GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span every rank's share of the batch.

    torch's SyncBatchNorm refuses CPU tensors; this one sums per-channel counts, sums and
    squared sums with an autograd-aware all-reduce (``torch.distributed.nn``), which works on
    gloo as well, so gradients flow through the global mean and variance exactly as they do
    through single-process BatchNorm over the whole batch. Eval mode uses the running
    statistics, as BatchNorm does.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        import warnings

        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]  # every axis but the channel: x is (B, C, ...)
        # float64 sums: var = E[x^2] - E[x]^2 cancels badly in float32 where the mean is large
        # against the spread (the stem's BatchNorm, fed by raw intensities).
        xd = x.double()
        count = torch.tensor([float(x.numel() // x.shape[1])], device=x.device, dtype=xd.dtype)
        # (1 + 2C,): count, per-channel sums and squared sums over this rank's share
        stats = torch.cat([count, xd.sum(dims), (xd * xd).sum(dims)])
        with warnings.catch_warnings():
            # deprecated in favour of functional collectives, which have no autograd for it
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(stats)  # summed over ranks; its backward sums gradients
        c = x.shape[1]
        n, mean = stats[0], stats[1 : c + 1] / stats[0]
        var = (stats[c + 1 :] / n - mean * mean).clamp_min(0.0)  # biased, as BN normalises
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                assert self.running_var is not None and self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                unbiased = var.detach() * float(n / (n - 1).clamp_min(1))
                self.running_var.mul_(1 - m).add_(unbiased * m)
        shape = [1, c] + [1] * (x.dim() - 2)
        mean, var = mean.float(), var.float()
        y = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` computing global-batch statistics (same parameters and
    buffers, so state dicts keep their keys): torch's SyncBatchNorm on CUDA, ours on CPU."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, _GlobalBatchNorm
    ):
        out = _GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out
