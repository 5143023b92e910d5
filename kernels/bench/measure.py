"""Timing and peak-memory measurement shared by the kernel benchmarks (kernels/bench/*.py).

Time: median milliseconds of ``iters`` calls after ``warmup`` calls; CUDA events on a GPU (device
time, synchronized), ``time.perf_counter`` on CPU (wall time on a machine other jobs share).
Peak memory: bytes above the level at entry; CUDA ``max_memory_allocated``, CPU the process's
peak-RSS increase (``/proc/self/clear_refs`` reset of VmHWM, Linux >= 4.0), which includes
allocator slack. Call :func:`pin_mmap_threshold` once before measuring on CPU so freed tensors
leave RSS and a later provider's peak shows.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Optional

import torch


def default_iterations(device: str, warmup: Optional[int], iters: Optional[int]) -> tuple[int, int]:
    """(warmup, iters), filling what the user left unset: 10 / 50 on CUDA, 1 / 5 on CPU (2 shared
    cores: a few calls already give a stable median for the ratios one run reports)."""
    return (warmup if warmup is not None else (10 if device == "cuda" else 1),
            iters if iters is not None else (50 if device == "cuda" else 5))


def median_ms(fn: Callable[[], None], device: str, warmup: int, iters: int) -> float:
    """Median time of one ``fn()`` call in ms over ``iters`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class PeakMemory:
    """Context manager: ``bytes`` = peak memory above the level at entry (None where it cannot be
    measured, e.g. CPU without /proc)."""

    def __init__(self, device: str):
        self.device = device
        self.bytes: Optional[int] = None
        self._base: Optional[int] = None

    @staticmethod
    def _status_kb(field: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                return next((int(line.split()[1]) for line in f if line.startswith(field)), None)
        except OSError:
            return None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self._base = self._status_kb("VmRSS:")
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._base
        elif self._base is not None:
            hwm = self._status_kb("VmHWM:")
            self.bytes = None if hwm is None else max(0, hwm - self._base) * 1024
        return False


def pin_mmap_threshold(nbytes: int = 64 * 1024) -> bool:
    """CPU peak-RSS fidelity: glibc's adaptive mmap threshold keeps freed multi-MB blocks resident,
    hiding a later provider's peak in RSS; a fixed threshold (M_MMAP_THRESHOLD = -3) maps and unmaps
    every block above ``nbytes``. Returns whether it could be set (glibc only)."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, nbytes))
    except (OSError, AttributeError):
        return False


def failure_text(exc: BaseException) -> str:
    """One line for a row whose measurement failed (a provider refusing a case is a result)."""
    first = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def device_label(device: str) -> str:
    """The measuring machine for a result file's metadata: GPU name, or CPU model and thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or 'unknown'}, {torch.get_num_threads()} threads)"


def peak_memory_method(device: str, rss_exact: bool) -> str:
    """How :class:`PeakMemory` measured on ``device``, for a result file's metadata."""
    if device == "cuda":
        return "cuda max_memory_allocated"
    return f"peak RSS increase (fixed mmap threshold: {rss_exact})"
