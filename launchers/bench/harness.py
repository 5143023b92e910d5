"""The harness every benchmark in launchers/bench runs on: command line, timing, table, JSON file and
environment record. A benchmark program holds only its cases and its providers (the way Liger-Kernel's
``benchmark/scripts/benchmark_<op>.py`` files sit on its ``utils.py``)::

    p = harness.parser(__doc__, "python -m launchers.bench.<name>")    # --out (alias --json)
    args = p.parse_args(argv)
    record = harness.start("<name>", args, device)        # environment now; --out checked writable
    rows = harness.measure_providers(...)  /  harness.rounds(...)
    print(harness.format_table(rows, COLUMNS))
    harness.save(args.out, record, rows=rows)            # JSON, written atomically

Timing. Providers compared in one run are measured in that run, interleaved, so a change of load on a
shared machine hits them alike:

* :func:`measure_providers`, for torch callables (a kernel, a layer): max |error| of the output against
  a reference, bytes allocated and peak from a clean baseline after a warm-up call, then medians of
  calls interleaved across the providers (and CUDA-graph replays), all from ``kernels.measure``, the
  primitives ``kernels.verify`` also uses;
* :func:`rounds`, for whole runs (a loader, the converter, a worker's augmentation): every provider
  once a round, in order; the first rounds warm caches and are dropped.

The JSON file is ``{"benchmark", "environment", "settings", <the program's sections>}``. The
environment record: date (UTC), git commit and whether tracked files had changes, python / torch /
triton / CUDA versions, the measuring device and any GPU, CPU count, torch threads, and the load
average at the start and at the end of the run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar, overload

import torch

from engine.atomic import atomic_write_text
from engine.errors import UserError, probe_writable
from kernels.measure import graph_median_ms, interleaved_medians, measure_memory, memory_method

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
INTERPRETER = "triton (INTERPRETER: correctness only)"
T = TypeVar("T")
Forward = Callable[[], torch.Tensor]


# ---- environment record and result file ------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the platform has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def device_label(device: str) -> str:
    """The measuring device: the GPU's name, or the CPU model and torch's thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads)"


def environment(device: str = "cpu") -> dict:
    """Where, when and on what code a figure was measured."""
    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": None if changes is None else bool(changes),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "device": device_label(device),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
    }


def start(benchmark: str, args: argparse.Namespace | Mapping[str, Any], device: str = "cpu") -> dict:
    """The head of a result file: the benchmark's name, the environment now and the settings (the parsed
    flags but ``out``). Refuses an ``out`` that cannot be written before anything is measured."""
    settings = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    out = settings.pop("out", None)
    if out:
        err = probe_writable(Path(out).parent)
        if err is not None:
            raise UserError(f"--out '{out}': {err.strerror or err}; choose a writable directory")
    return {"benchmark": benchmark, "environment": environment(device), "settings": settings}


def save(path: str | None, record: dict, **sections: Any) -> dict:
    """``record`` + ``sections`` (rows, meta, ...), the load average at the end added to the environment;
    written as JSON to ``path`` (atomically) when one is given. Returns the result."""
    result = {**record, "environment": {**record["environment"], "load_average_end": load_average()}, **sections}
    if path:
        atomic_write_text(path, json.dumps(result, indent=1, default=str))
        print(f"wrote {path}")
    return result


# ---- command line ------------------------------------------------------------------------------------
def parser(doc: str, prog: str, out: str | None = None) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first paragraph as description, ``--out`` (or ``--json``)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument(
        "--out",
        "--json",
        dest="out",
        default=out,
        metavar="PATH",
        help="write the rows, the settings and the environment record as JSON here"
        + (f" (default {out})" if out else ""),
    )
    return p


@overload
def comma_list(
    text: str, flag: str, choices: Sequence[str] | None = None, *, hint: str = "", allow_empty: bool = False
) -> list[str]: ...


@overload
def comma_list(
    text: str,
    flag: str,
    choices: Sequence[str] | None = None,
    *,
    cast: Callable[[str], T],
    hint: str = "",
    allow_empty: bool = False,
) -> list[T]: ...


def comma_list(
    text: str,
    flag: str,
    choices: Sequence[str] | None = None,
    *,
    cast: Callable[[str], Any] = str,
    hint: str = "",
    allow_empty: bool = False,
) -> list[Any]:
    """``'a,b'`` -> ``[cast('a'), cast('b')]`` in the given order; an empty list (unless allowed), a value
    outside ``choices`` or one ``cast`` refuses is a UserError naming ``flag`` (``hint`` says more)."""
    parts = [s.strip() for s in str(text).split(",") if s.strip()]
    bad = [s for s in parts if choices is not None and s not in choices]
    try:
        values = [cast(s) for s in parts]
    except ValueError:
        bad = bad or parts
    if bad or not (parts or allow_empty):
        what = f"use {', '.join(choices)} (comma separated)" if choices is not None else "a comma-separated list"
        raise UserError(f"{flag} {text!r}: {what}" + (f"; {hint}" if hint else ""))
    return values


def int_groups(text: str, flag: str, size: int, example: str) -> list[tuple[int, ...]]:
    """``'1,2,3;4,5,6'`` -> ``[(1, 2, 3), (4, 5, 6)]``: groups of ``size`` positive integers split by ';'."""
    try:
        groups = [tuple(int(x) for x in g.split(",")) for g in text.split(";") if g.strip()]
    except ValueError:
        groups = []
    if not groups or any(len(g) != size or min(g) < 1 for g in groups):
        raise UserError(
            f"{flag} {text!r}: expected groups of {size} positive integers separated by ';', e.g. {example!r}"
        )
    return groups


def kernel_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the torch-callable benchmarks (LoRA linear, attention)."""
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument(
        "--providers", default=None, help="comma list, in the order they are measured (default: all usable here)"
    )
    p.add_argument("--modes", default="fwd,fwd_bwd", help="fwd, fwd_bwd (forward and gradients) or both")
    p.add_argument("--warmup", type=int, default=None, help="default 10 on CUDA, 1 on CPU")
    p.add_argument("--iters", type=int, default=None, help="default 50 on CUDA, 5 on CPU")
    p.add_argument("--cuda-graph", action="store_true", help="CUDA: also time CUDA-graph replays")
    p.add_argument("--no-interpreter-row", action="store_true", help="CPU: skip the Triton-interpreter row")


def kernel_settings(args: argparse.Namespace) -> torch.dtype:
    """Check :func:`kernel_flags`' values and fill what was left unset (modes as a list; warm-up and
    iterations: 10 / 50 on CUDA, 1 / 5 on CPU, where 2 shared cores give a stable median in a few calls).
    Returns the dtype."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu")
    if args.cuda_graph and args.device != "cuda":
        raise UserError("--cuda-graph: CUDA graphs need --device cuda")
    args.modes = comma_list(args.modes, "--modes", ("fwd", "fwd_bwd"))
    cuda = args.device == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.iters = args.iters if args.iters is not None else (50 if cuda else 5)
    return DTYPES[args.dtype or ("bf16" if cuda else "fp32")]


# ---- timing --------------------------------------------------------------------------------------------
def rounds(providers: Mapping[str, Callable[[], T]], repeat: int, warmup: int = 1) -> dict[str, list[T]]:
    """Each provider's results of ``repeat`` rounds. A round calls every provider once, in order; the first
    ``warmup`` rounds (page cache, lazy imports, first worker start) are run and dropped."""
    runs: dict[str, list[T]] = {name: [] for name in providers}
    for i in range(warmup + repeat):
        for name, fn in providers.items():
            result = fn()
            if i >= warmup:
                runs[name].append(result)
    return runs


def medians(runs: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """Per key, the median over ``runs`` (dicts of figures, e.g. from :func:`rounds`)."""
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def failure_text(exc: BaseException) -> str:
    """One line for a row whose measurement failed (a provider refusing a case is a result)."""
    first = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def measure_providers(
    builders: Mapping[str, Callable[[], tuple[Forward, Sequence[torch.Tensor]]]],
    case: dict,
    *,
    mode: str,
    grad_out: torch.Tensor,
    reference: torch.Tensor | None,
    device: str,
    warmup: int,
    iters: int,
    flops: float,
    cuda_graph: bool = False,
) -> list[dict]:
    """One row per provider on one case. ``builders[name]()`` gives (forward, the tensors ``fwd_bwd``
    differentiates with ``grad_out``). Per provider: max |forward - reference| (when a reference is
    given), one warm-up step (one-off allocations stay out of the figures), bytes allocated and peak
    over one step from a clean baseline; then the median ms of steps interleaved across the providers,
    TFLOP/s from ``flops``, and with ``cuda_graph`` CUDA-graph replays. A provider that cannot build
    or run the case gets an ``error`` instead."""
    rows: dict[str, dict] = {}
    steps: dict[str, Callable[[], None]] = {}
    for name, build in builders.items():
        row = rows[name] = {"provider": name, **case}
        try:
            forward, targets = build()

            def step(forward=forward, targets=targets):
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    out = forward()
                    if mode == "fwd_bwd":
                        torch.autograd.grad(out, targets, grad_out)

            if reference is not None:
                with torch.no_grad():
                    row["max_abs_err"] = (forward().float() - reference).abs().max().item()
            step()  # warm-up: one-off allocations (autograd engine, BLAS buffers) stay out of the figures
            row["alloc_mb"], row["peak_mb"] = (b / 2**20 for b in measure_memory(step, device))
            steps[name] = step
        except Exception as e:  # noqa: BLE001 - a provider refusing a case is a result, not a crash
            row["error"] = failure_text(e)
    for name, ms in interleaved_medians(steps, device, warmup, iters).items():
        rows[name].update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
    if cuda_graph:
        for name, fn in steps.items():
            rows[name]["graph_ms"], rows[name]["graph_timing"] = graph_median_ms(fn, iters)
    for row in rows.values():
        log.info("%s", row)
    return list(rows.values())


def kernel_report(
    args: argparse.Namespace,
    record: dict,
    rows: list[dict],
    interpreter: Callable[[], dict],
    show: Callable[[list[dict]], str],
    grads: str,
    dtype: torch.dtype,
    baseline: str,
    **meta: Any,
) -> None:
    """The end of a torch-callable benchmark: on CPU the Triton-interpreter correctness row (unless
    ``--no-interpreter-row``), the table(s) ``show`` renders, that row's gradient error (``grads``: the
    gradients' names), and the result file with the run's meta."""
    if args.device == "cpu" and not args.no_interpreter_row:
        rows.append(interpreter())
    print(show(rows))
    for r in rows:
        if "max_abs_grad_err" in r:
            print(f"{r['provider']}: max |{grads} - reference| = {r['max_abs_grad_err']:.2e}")
    save(
        args.out,
        record,
        rows=rows,
        meta={
            "dtype": str(dtype),
            "baseline": baseline,
            "warmup": args.warmup,
            "iters": args.iters,
            **meta,
            "timing": "medians, providers interleaved per round",
            "memory": memory_method(args.device),
        },
    )


def interpreter_row(
    ours: Forward, reference: Forward, targets: Sequence[torch.Tensor], grad_out: torch.Tensor, case: dict
) -> dict:
    """One forward + backward of ``ours`` (a Triton kernel under TRITON_INTERPRET=1 on CPU) against
    ``reference``: max |output error| and max |gradient error| over ``targets``. Its time is no
    performance figure."""
    t0 = time.perf_counter()
    out = ours()
    grads = torch.autograd.grad(out, targets, grad_out)
    ms = (time.perf_counter() - t0) * 1e3
    ref = reference()
    ref_grads = torch.autograd.grad(ref, targets, grad_out)
    return {
        "provider": INTERPRETER,
        **case,
        "ms": ms,
        "max_abs_err": (out - ref).abs().max().item(),
        "max_abs_grad_err": max((g - gr).abs().max().item() for g, gr in zip(grads, ref_grads)),
    }


# ---- tables --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One table column: title, the row's value (a key, or a function of the row; None prints '-'), its
    format, whether it is left-aligned, and whether it is left out when no row has a value."""

    title: str
    value: str | Callable[[dict], Any]
    fmt: str = "{}"
    left: bool = False
    optional: bool = False

    def get(self, row: dict) -> Any:
        return row.get(self.value) if isinstance(self.value, str) else self.value(row)

    def cell(self, row: dict) -> str:
        v = self.get(row)
        return "-" if v is None else self.fmt.format(v)


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or zero."""
    return num / den if num and den else None


def baseline_of(rows: Sequence[dict], baseline: str, keys: Sequence[str]) -> Callable[[dict], dict]:
    """row -> the ``baseline`` provider's timed row of the same case (same ``keys``), or {} (also for
    the interpreter's correctness row)."""
    index = {tuple(r[k] for k in keys): r for r in rows if r["provider"] == baseline and "ms" in r}
    return lambda r: {} if r["provider"] == INTERPRETER else index.get(tuple(r.get(k) for k in keys), {})


def format_table(rows: Sequence[dict], columns: Sequence[Column], markdown: bool = False, lead: int = 0) -> str:
    """Rows as aligned text (a header, a rule, a line per row) or as a Markdown table. A row with an
    ``error`` shows its first ``lead`` cells and then ``n/a: <error>``."""
    columns = [c for c in columns if not c.optional or any(c.get(r) is not None for r in rows)]
    cells = [[c.title for c in columns]] + [[c.cell(r) for c in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" if c.left else "---:" for c in columns) + "|"]
        for r, line in zip(rows, cells[1:]):
            if lead and "error" in r:
                line = line[:lead] + [f"n/a: {r['error']}"] + [""] * (len(columns) - lead - 1)
            lines.append("| " + " | ".join(line) + " |")
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def fit(line: list[str]) -> str:
        return " ".join(f"{s:<{w}}" if c.left else f"{s:>{w}}" for s, w, c in zip(line, widths, columns)).rstrip()

    head = fit(cells[0])
    lines = [head, "-" * len(head)]
    for r, line in zip(rows, cells[1:]):
        lines.append(fit(line[:lead]) + f" n/a: {r['error']}" if lead and "error" in r else fit(line))
    return "\n".join(lines)
