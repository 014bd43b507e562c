"""The few collectives a run needs under ``torch.distributed`` (one process: no-ops)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["join_process_group", "world", "wrap", "any_rank", "mean", "mean_with_flag", "barrier"]


def join_process_group(device: str) -> bool:
    """Join the process group that torchrun describes (WORLD_SIZE > 1): nccl on GPUs, gloo on CPUs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def world() -> tuple[int, int]:
    """(world size, rank): (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module the loss's forward pass goes through: DistributedDataParallel over several ranks.

    The deviation's extra forward passes use the bare module: autograd sums both paths into each parameter
    before DDP's hook fires. Models often hold parameters that a loss does not reach (e.g. the last EGNN
    layer's feature update when only positions are predicted): DDP is told to find them instead of failing.
    """
    if world()[0] == 1:
        return model
    device_ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (rank 0 decides, e.g. after an evaluation only it ran)."""
    if world()[0] == 1:
        return flag
    shared = torch.tensor([float(flag)], device=device)
    dist.broadcast(shared, 0)
    return bool(shared.item())


def mean(value: float, device: torch.device) -> float:
    """The mean of ``value`` over ranks."""
    size = world()[0]
    if size == 1:
        return value
    shared = torch.tensor([value], device=device)
    dist.all_reduce(shared)
    return shared.item() / size


def mean_with_flag(tensors: Callable[[], list[torch.Tensor]], flag: bool) -> torch.Tensor | None:
    """The rank averages of the concatenated ``tensors()`` with ``flag`` (OR-ed over ranks: > 0 if any rank
    set it) last, in one collective; None for a single process, which does not call ``tensors``."""
    size = world()[0]
    if size == 1:
        return None
    parts = tensors()
    shared = torch.cat([*parts, torch.tensor([float(flag)], device=parts[0].device)])
    dist.all_reduce(shared)
    return shared / size


def barrier() -> None:
    if world()[0] > 1:
        dist.barrier()
