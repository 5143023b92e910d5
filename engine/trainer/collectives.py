"""The cross-rank reductions the objectives need, injected into them by the trainer.

``engine/objectives`` never imports ``torch.distributed`` (parallelism stays out of the model);
the trainer hands ``all_reduce_sum`` to ``build_objective(..., all_reduce=all_reduce_sum)``. When
no process group is initialised (single process, unit tests) every function is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group is initialised (deepspeed / torchrun launch)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks IN PLACE and return it (identity without a process group).

    Blocking, on the default group: every rank must call it in the same order with a tensor of
    the same shape and dtype, on the device the backend expects (CUDA for NCCL, CPU for gloo).
    Callers pass a tensor they own (a fresh sum, a count), never a parameter.
    """
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
