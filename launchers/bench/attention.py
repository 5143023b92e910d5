"""Attention microbenchmark: our Triton flash kernel vs PyTorch SDPA backends vs xformers vs reference.

    python -m launchers.bench.attention --out bench_attention.json            # GPU: ViT-B/L shapes
    python -m launchers.bench.attention --device cpu --out bench_attention_cpu.json

Per shape (B, H, N, D) and mode (``fwd``, ``fwd_bwd``): median time (providers interleaved, see
kernels.measure), TFLOP/s, bytes allocated during the call and its peak (each provider from a
clean baseline after warm-up), plus the max |error| of the forward against the fp32 reference.
``--cuda-graph`` adds CUDA-graph replay timings. FLOPs follow the FlashAttention convention:
fwd = 4*B*H*N^2*D, fwd+bwd = 3.5x that (backward recomputes QK^T).

Providers: ``triton`` (kernels.attention), ``sdpa-flash`` / ``sdpa-cudnn`` / ``sdpa-efficient`` /
``sdpa-math`` (``torch.nn.attention.sdpa_kernel`` pins one backend; CUDA only), ``sdpa`` (PyTorch's
own choice; the CPU baseline), ``xformers`` (when it imports), ``reference`` (explicit fp32
softmax). A provider that cannot run a case (e.g. flash SDPA in fp32) is reported with its error.

On CPU there is no compiled Triton: the ``triton`` provider runs in the interpreter
(TRITON_INTERPRET=1) on one tiny shape as a correctness row; its time is NOT a performance figure.
Registers and spills of the compiled kernels: ``python -m launchers.bench.ptxas`` (no GPU needed).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Callable, Optional

import torch

from engine.atomic import atomic_write_text
from engine.errors import UserError, cli_entry
from engine.progress import setup_logging
from kernels.measure import (default_iterations, device_label, failure_text, graph_median_ms,
                                   interleaved_medians, measure_memory, memory_method)
from kernels.reference import attention_reference

log = logging.getLogger(__name__)

GPU_SHAPES = [  # (B, H, N, D): ViT-B (12 heads) and ViT-L (16 heads), 224/256/512 px at patch 16
    (64, 12, 197, 64), (64, 12, 257, 64), (16, 12, 1025, 64),
    (64, 16, 197, 64), (64, 16, 257, 64), (16, 16, 1025, 64),
]
CPU_SHAPES = [(4, 12, 197, 64), (2, 12, 257, 64), (1, 12, 1025, 64)]
INTERPRETER_SHAPE = (1, 2, 197, 64)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _sdpa(backend: Optional[str]) -> Attn:
    def run(q, k, v, scale):
        if backend is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend)):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return run


def _xformers(q, k, v, scale):
    import xformers.ops as xops

    return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           scale=scale).transpose(1, 2)


def _triton(q, k, v, scale):
    from kernels.attention import flash_attention

    return flash_attention(q, k, v, scale)


def providers(device: str, names: Optional[list[str]]) -> dict[str, Attn]:
    from kernels.dispatch import xformers_available

    table: dict[str, Attn] = {"reference": attention_reference, "sdpa": _sdpa(None)}
    if device == "cuda":
        table.update({"sdpa-flash": _sdpa("FLASH_ATTENTION"), "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
                      "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"), "sdpa-math": _sdpa("MATH"), "triton": _triton})
        if xformers_available():
            table["xformers"] = _xformers
    if names:
        unknown = [n for n in names if n not in table]
        if unknown:
            raise UserError(f"--providers: {', '.join(unknown)} not available on {device}; "
                            f"choose from {', '.join(table)}")
        table = {n: table[n] for n in names}
    return table


def attention_flops(B: int, H: int, N: int, D: int, mode: str) -> float:
    fwd = 4.0 * B * H * N * N * D
    return fwd if mode == "fwd" else 3.5 * fwd


def bench_case(table: dict[str, Attn], shape: tuple[int, int, int, int], dtype: torch.dtype, mode: str,
               device: str, args, ref: torch.Tensor) -> list[dict]:
    """Rows for every provider on one (shape, mode): error, memory each from a clean baseline, then
    timings interleaved across the providers."""
    B, H, N, D = shape
    torch.manual_seed(0)
    # timm layout: q, k, v are strided views into one (B, N, 3, H, D) projection output
    qkv = torch.randn(B, N, 3, H, D, device=device).to(dtype).requires_grad_(mode == "fwd_bwd")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scale = D ** -0.5
    do = torch.randn(B, H, N, D, device=device, dtype=dtype)
    rows, steps = {}, {}
    for name, attn in table.items():
        row = rows[name] = {"provider": name, "B": B, "H": H, "N": N, "D": D,
                            "dtype": str(dtype).replace("torch.", ""), "mode": mode, "device": device}

        def step(attn=attn):
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                out = attn(q, k, v, scale)
                if mode == "fwd_bwd":
                    torch.autograd.grad(out, qkv, do)

        try:
            with torch.no_grad():
                row["max_abs_err"] = (attn(q, k, v, scale).float() - ref).abs().max().item()
            step()  # first call pays one-off costs (autograd threads, workspaces) outside the figures
            row["alloc_mb"], row["peak_mb"] = (v_ / 2**20 for v_ in measure_memory(step, device))
            steps[name] = step
        except Exception as e:  # noqa: BLE001 - a backend refusing a case is a result, not a crash
            row["error"] = failure_text(e)
    for name, ms in interleaved_medians(steps, device, args.warmup, args.iters).items():
        rows[name].update(ms=ms, tflops=attention_flops(B, H, N, D, mode) / (ms * 1e-3) / 1e12)
    if args.cuda_graph:
        for name, step in steps.items():
            rows[name]["graph_ms"], rows[name]["graph_timing"] = graph_median_ms(step, args.iters)
    return list(rows.values())


def _reference_out(shape, dtype, device) -> torch.Tensor:
    B, H, N, D = shape
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, device=device).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return attention_reference(q.float(), k.float(), v.float(), D ** -0.5)


def interpreter_row(warmup: int) -> dict:
    """Tiny Triton-interpreter correctness check on CPU: fwd+bwd vs reference (fp32)."""
    B, H, N, D = INTERPRETER_SHAPE
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    do = torch.randn(B, H, N, D)
    t0 = time.perf_counter()
    out = _triton(q, k, v, D ** -0.5)
    (g,) = torch.autograd.grad(out, qkv, do)
    ms = (time.perf_counter() - t0) * 1e3
    ref = attention_reference(q, k, v, D ** -0.5)
    (g_ref,) = torch.autograd.grad(ref, qkv, do)
    return {"provider": "triton (INTERPRETER: correctness only)", "B": B, "H": H, "N": N, "D": D,
            "dtype": "float32", "mode": "fwd_bwd", "device": "cpu", "ms": ms,
            "max_abs_err": (out - ref).abs().max().item(), "max_abs_grad_err": (g - g_ref).abs().max().item()}


def format_table(rows: list[dict], baseline: str) -> str:
    base = {(r["B"], r["H"], r["N"], r["D"], r["mode"]): r for r in rows if r["provider"] == baseline and "ms" in r}
    head = (f"{'provider':<40} {'B':>3} {'H':>3} {'N':>5} {'D':>4} {'mode':<8} {'ms':>10} {'TFLOP/s':>8} "
            f"{'alloc MB':>9} {'peak MB':>8} {'vs ' + baseline:>12} {'max|err|':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = f"{r['provider']:<40} {r['B']:>3} {r['H']:>3} {r['N']:>5} {r['D']:>4} {r['mode']:<8}"
        if "error" in r:
            lines.append(f"{lead} {'failed: ' + r['error']}")
            continue
        b = base.get((r["B"], r["H"], r["N"], r["D"], r["mode"]), {})
        ratio = f"{b['ms'] / r['ms']:.2f}x" if b and "INTERPRETER" not in r["provider"] else "-"
        tf = f"{r['tflops']:.3f}" if r.get("tflops") is not None else "-"
        al = f"{r['alloc_mb']:.1f}" if r.get("alloc_mb") is not None else "-"
        pk = f"{r['peak_mb']:.1f}" if r.get("peak_mb") is not None else "-"
        graph = f"  graph {r['graph_ms']:.3f} ms ({r['graph_timing']})" if "graph_ms" in r else ""
        lines.append(f"{lead} {r['ms']:>10.3f} {tf:>8} {al:>9} {pk:>8} {ratio:>12} {r['max_abs_err']:>9.2e}{graph}")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--shapes", default=None, help="'B,H,N,D;B,H,N,D;...' (default: ViT-B/L set for the device)")
    p.add_argument("--providers", default=None, help="comma list (default: all available)")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--warmup", type=int, default=None, help="default 10 on CUDA, 1 on CPU")
    p.add_argument("--iters", type=int, default=None, help="default 50 on CUDA, 5 on CPU")
    p.add_argument("--baseline", default=None, help="provider the ratios are against "
                                                    "(default sdpa-flash on CUDA, reference on CPU)")
    p.add_argument("--no-interpreter-row", action="store_true", help="CPU: skip the Triton-interpreter row")
    p.add_argument("--cuda-graph", action="store_true", help="CUDA: also time CUDA-graph replays")
    p.add_argument("--out", default=None, help="write the rows and run metadata as JSON here")
    return p.parse_args(argv)


def _parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    try:
        shapes = [tuple(int(x) for x in s.split(",")) for s in text.split(";") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 4 or min(s) < 1 for s in shapes):
        raise UserError(f"--shapes {text!r}: expected 'B,H,N,D' groups separated by ';', e.g. '64,12,197,64'")
    return shapes


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


@cli_entry
def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    args = parse_args(argv)
    device = args.device
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.attention imports triton
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu")
    if args.cuda_graph and device != "cuda":
        raise UserError("--cuda-graph: CUDA graphs need --device cuda")
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    shapes = _parse_shapes(args.shapes) if args.shapes else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("fwd", "fwd_bwd") for m in modes):
        raise UserError(f"--modes {args.modes!r}: use fwd, fwd_bwd or both (comma separated)")
    table = providers(device, args.providers.split(",") if args.providers else None)
    baseline = args.baseline or ("sdpa-flash" if device == "cuda" else "reference")
    args.warmup, args.iters = default_iterations(device, args.warmup, args.iters)

    rows = []
    for shape in shapes:
        ref = _reference_out(shape, dtype, device)
        for mode in modes:
            for row in bench_case(table, shape, dtype, mode, device, args, ref):
                log.info("%s", row)
                rows.append(row)
        del ref
    if device == "cpu" and not args.no_interpreter_row:
        rows.append(interpreter_row(args.warmup))
    print(format_table(rows, baseline))
    for r in rows:
        if "max_abs_grad_err" in r:
            print(f"{r['provider']}: max |dq,dk,dv - reference| = {r['max_abs_grad_err']:.2e}")
    meta = {"device": device_label(device),
            "torch": torch.__version__, "dtype": str(dtype), "baseline": baseline, "warmup": args.warmup,
            "iters": args.iters, "timing": "medians, providers interleaved per round",
            "flops_convention": "fwd 4*B*H*N^2*D; fwd_bwd 3.5x fwd", "memory": memory_method(device)}
    meta["triton"] = _triton_version()
    if args.out:
        atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    main()
