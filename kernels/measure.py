"""Timing and memory measurement of torch callables, for kernels.verify and the benchmarks (launchers/bench).

Time: medians of ``iters`` calls after ``warmup`` calls. Providers compared in one run are timed
*interleaved* (:func:`interleaved_medians`: one call of each per round, the order rotating), so a
load change on a shared machine hits them alike. CUDA: events around each call (device time), or
around CUDA-graph replays (:func:`graph_median_ms`: no Python launch overhead). CPU: wall time.

Memory (:func:`measure_memory`), each provider from a clean baseline -- garbage collected, CUDA
cache emptied and peak statistics reset, after its warm-up -- over one call:
* ``allocated``: bytes the call allocates in all (the sum of every allocation, freed or not);
* ``peak``: the most bytes live at once above the level at entry.
On CUDA both come from the caching allocator's counters. On CPU they come from the torch profiler's
allocation events (``profile_memory``), summed in time order: an exact count of tensor memory,
unlike the process's RSS, which charged whichever provider ran first for one-off buffers.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping

import torch


def _time_once(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[], object], device: str, warmup: int, iters: int) -> float:
    """Median time of one ``fn()`` call in ms over ``iters`` calls, after ``warmup`` untimed calls."""
    return interleaved_medians({"fn": fn}, device, warmup, iters)["fn"]


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]], device: str, warmup: int, iters: int
) -> dict[str, float]:
    """Median ms per provider; each round calls every provider once, starting one further along."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            times[n].append(_time_once(fns[n], device))
    return {n: statistics.median(t) for n, t in times.items()}


def graph_median_ms(fn: Callable[[], object], iters: int) -> tuple[float, str]:
    """CUDA only: (median ms of a CUDA-graph replay of ``fn``, "graph"), or eager timing and the reason
    the capture failed. ``fn`` must already be warmed up (kernels compiled, workspaces allocated)."""
    run: Callable[[], object]
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture needs a warmed-up side stream, as torch.cuda.graphs says
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run, how = graph.replay, "graph"
    except Exception as e:  # noqa: BLE001 - a provider that cannot be captured still gets a time
        torch.cuda.synchronize()
        run, how = fn, f"eager (capture failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    run()
    torch.cuda.synchronize()
    return statistics.median(_time_once(run, "cuda") for _ in range(iters)), how


def clean_baseline(device: str) -> None:
    """Drop what earlier providers left behind, so the next measurement starts level."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure_memory(fn: Callable[[], object], device: str) -> tuple[int, int]:
    """(bytes allocated in all, peak bytes live above the entry level) during one ``fn()`` call."""
    clean_baseline(device)
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        total0 = torch.cuda.memory_stats().get("allocated_bytes.all.allocated", 0)
        fn()
        torch.cuda.synchronize()
        total = torch.cuda.memory_stats().get("allocated_bytes.all.allocated", 0) - total0
        return int(total), int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    allocated = live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
        allocated += max(nbytes, 0)
    return allocated, peak


def memory_method(device: str) -> str:
    """How :func:`measure_memory` measured on ``device``, for a result file's metadata."""
    if device == "cuda":
        return "cuda caching-allocator counters (allocated_bytes.all.allocated, max_memory_allocated)"
    return "torch profiler allocation events (profile_memory), summed in time order"
