"""Data-parallel training under ``torchrun``: the same pipeline on N processes, one result.

``torchrun --nproc_per_node N -m training run --config …`` starts N processes with ``RANK`` and
``WORLD_SIZE`` set; ``setup`` joins them into one process group (gloo on the CPU, NCCL where
CUDA is there). Every trainable stage then splits each global batch across the processes and
averages gradients after every step (so N processes take the very steps one process would, on
the same global batch), and BatchNorm statistics at the end of each epoch. Stages that are not
trained (similarity, clustering, confusion, export, sweep) run on rank 0 while the others wait;
only rank 0 writes files. One process, without ``torchrun``, behaves exactly as before: every
helper here is a no-op when no process group exists.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


def setup() -> None:
    """Join the process group ``torchrun`` describes (no-op for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # Rank 0 works alone through the stages that are not trained (an export, the τ sweep), so
    # the others may wait at a barrier for a long time.
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=6))
    logger.info("rank %d of %d (%s)", rank(), world_size(), backend)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes files and runs the stages that are not trained."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This process's share of a global batch (every process a disjoint, near-equal part)."""
    return indices[rank()::world_size()] if dist.is_initialized() else indices


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every process (they start from the same weights)."""
    if not dist.is_initialized():
        return
    for tensor in (*module.parameters(), *module.buffers()):
        dist.broadcast(tensor.data, src=0)


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Mean of every process's gradients, in place: the step of the whole global batch."""
    if not dist.is_initialized():
        return
    world = world_size()
    for p in parameters:
        if p.requires_grad:
            if p.grad is None:  # a process whose shard did not reach this parameter
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def average_buffers(module: nn.Module) -> None:
    """Mean of the floating-point buffers (BatchNorm's running statistics) over processes."""
    if not dist.is_initialized():
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b.data, op=dist.ReduceOp.SUM)
            b.data.div_(world_size())


def total(*values: float) -> list[float]:
    """Sums over processes (for epoch statistics); the values themselves for one process."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
