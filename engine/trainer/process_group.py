"""Join (or create) the process group under any launcher: deepspeed, torchrun or plain python.

``deepspeed`` and ``torchrun`` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
a plain ``python launchers/pretrain.py`` has none, so we become a one-rank group on a free local
port. The backend is the accelerator's (NCCL on CUDA, gloo -- or oneCCL when installed -- on CPU),
the same code path everywhere.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now (a rendezvous / master port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def _skip_cpu_shm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op on the CPU accelerator.

    That op only serves DeepSpeed's inference all-reduce; training collectives go through
    torch.distributed (gloo). Building it costs ~80 s of C++ compilation on a fresh 2-core machine
    (measured), on every CI runner. DeepSpeed caches its op-compatibility table in
    ``deepspeed.ops.__compatible_ops__``, and marks an op it may not build by False there.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _cpu_threads() -> None:
    """One rank per core group: without OMP_NUM_THREADS every CPU rank would start one intra-op
    thread per core, and N ranks x C threads on C cores spin against each other (measured on a
    2-core machine, tiny ViT fwd+bwd: 0.15 s/step with 1 thread per rank, 1-2 s with 2)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    threads = max(1, (os.cpu_count() or 1) // max(local, 1))
    torch.set_num_threads(threads)
    log.info("CPU ranks: %d intra-op thread(s) per rank (set OMP_NUM_THREADS to override)", threads)


def init_distributed(timeout_minutes: int = 30) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (idempotent) and pick this rank's device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        _single_process_env()
    acc = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() == "cpu":
        _skip_cpu_shm_op()
        _cpu_threads()
    else:
        acc.set_device(local_rank)
    backend = acc.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    device = torch.device(acc.device_name(local_rank)) if acc.device_name() != "cpu" else torch.device("cpu")
    env = DistEnv(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device, backend=backend
    )
    log.info("process group: %d rank(s), backend %s, device %s", env.world_size, backend, device)
    return env


def _forget_deepspeed_groups() -> None:
    """Drop the sub-groups DeepSpeed caches at module level (``deepspeed.utils.groups``): they die
    with the process group, and a later group in the same process (tests, notebooks) must not meet
    them again ("Group ... is not registered")."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name, value in list(vars(groups).items()):
        if name == "mesh_device" or (name.startswith("_") and name.endswith("_GROUP") and name.isupper()):
            setattr(groups, name, {} if isinstance(value, dict) else None)
        elif name.endswith("_GROUP_RANKS") and isinstance(value, dict):
            value.clear()


def shutdown(clean: bool = False, barrier_s: float = 120.0) -> None:
    """Leave the process group so the launcher sees a clean exit.

    ``clean``: every rank reached the end of its work together (a finished or preempted run).
    The ranks then meet at a barrier (bounded by ``barrier_s`` on gloo) before tearing the group
    down: a rank that destroys its group while a peer still drains the last collective's sends
    can die in gloo's teardown with SIGABRT ("terminate called without an active exception").
    On an error path a peer may be dead or stuck elsewhere, so no barrier is tried (torchtitan
    does the same). Afterwards a collection pass frees the backend objects that reference cycles
    (engines, hooks) still hold, while the interpreter is whole.
    """
    if dist.is_available() and dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            try:
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=barrier_s))
                else:
                    dist.barrier()
            except RuntimeError as e:  # a peer left early: tear down anyway, the run's work is done
                log.warning("process group: exit barrier failed (%s); leaving anyway", str(e).splitlines()[0])
        dist.destroy_process_group()
    _forget_deepspeed_groups()
    gc.collect()
