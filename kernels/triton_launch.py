"""What every Triton kernel launch here needs: interpreter mode, the device guard, the dot precision.

Shared by ``kernels.attention`` and ``kernels.lora_linear`` (and read by ``launchers.bench.ptxas``,
which compiles the same launch configurations ahead of time). Nothing here imports triton, so
``kernels.dispatch`` can ask :func:`runnable_on` before paying for a triton import.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# CUDA caps grid dimensions 1 and 2 at 65535 programs; dimension 0 takes 2**31 - 1.
MAX_GRID_YZ = 65535


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels run in Python on CPU tensors (the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def runnable_on(device: torch.device) -> bool:
    """Whether a Triton kernel can launch on tensors of ``device`` here (CUDA, or the interpreter)."""
    return device.type == "cuda" or interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: IEEE fp32 for fp32 unless TF32 matmuls are allowed; fp16/bf16 ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s GPU (not the current one); a no-op for CPU tensors in the interpreter."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# A launch goes through :func:`launch`, so ``launchers.bench.ptxas`` can collect the exact kernel,
# arguments and meta-parameters the launchers would use (on meta tensors) and compile them for a GPU
# it does not have, instead of keeping a second copy of every launch configuration.
_recorded: list | None = None


@contextlib.contextmanager
def recording_launches() -> Iterator[list]:
    """Within the block, :func:`launch` appends ``(name, kernel, grid, args, kwargs)`` instead of launching."""
    global _recorded
    saved, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = saved


def launch(name: str, kernel, grid, ref: torch.Tensor, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on ``ref``'s device (or recorded, see :func:`recording_launches`)."""
    if _recorded is not None:
        _recorded.append((name, kernel, grid, args, kwargs))
        return
    if any(g > MAX_GRID_YZ for g in grid[1:]):  # a launch failure on the GPU; say why here instead
        raise ValueError(f"{name}: grid {grid} exceeds CUDA's {MAX_GRID_YZ} programs in dimensions 1-2")
    with device_guard(ref):
        kernel[grid](*args, **kwargs)
