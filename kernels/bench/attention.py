"""Attention microbenchmark: our Triton flash kernel vs PyTorch SDPA backends vs xformers vs reference.

    python -m kernels.bench.attention --out bench_attention.json            # GPU: ViT-B/L shapes
    python -m kernels.bench.attention --device cpu --out bench_attention_cpu.json
    python -m kernels.bench.attention --ptxas --out ptxas_attention.json    # no GPU needed

Per shape (B, H, N, D) and mode (``fwd``, ``fwd_bwd``): median time, TFLOP/s and peak extra memory
of one call, plus the max |error| of the forward against the fp32 reference. FLOPs follow the
FlashAttention convention: fwd = 4*B*H*N^2*D, fwd+bwd = 3.5x that (backward recomputes QK^T).

Providers: ``triton`` (kernels.attention), ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-math``
(``torch.nn.attention.sdpa_kernel`` pins one backend; CUDA only), ``sdpa`` (PyTorch's own choice;
the CPU baseline), ``xformers`` (when it imports), ``reference`` (explicit fp32 softmax). A provider
that cannot run a case (e.g. flash SDPA in fp32) is reported with its error, not dropped silently.

On CPU there is no compiled Triton: the ``triton`` provider runs in the interpreter
(TRITON_INTERPRET=1) on one tiny shape as a correctness row; its time is NOT a performance figure.
Peak memory: CUDA ``max_memory_allocated`` above the inputs; CPU the process's peak-RSS increase
(``/proc/self/clear_refs`` reset, Linux), which includes allocator slack.

``--ptxas``: no timing; compiles every kernel with the exact launch configuration of
``kernels.attention.launch_configs`` for sm_80 and sm_90 (Triton's bundled ptxas, no GPU needed) and
reports shared memory, registers and register-spill bytes per thread -- the static evidence behind the
tile choices until GPU timings exist.
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
from kernels.bench.measure import (PeakMemory, default_iterations, device_label, failure_text, median_ms,
                                   peak_memory_method, pin_mmap_threshold)
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
        table.update({"sdpa-flash": _sdpa("FLASH_ATTENTION"), "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
                      "sdpa-math": _sdpa("MATH"), "triton": _triton})
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


def bench_case(name: str, attn: Attn, shape: tuple[int, int, int, int], dtype: torch.dtype, mode: str,
               device: str, warmup: int, iters: int, ref: torch.Tensor) -> dict:
    B, H, N, D = shape
    row = {"provider": name, "B": B, "H": H, "N": N, "D": D, "dtype": str(dtype).replace("torch.", ""),
           "mode": mode, "device": device}
    torch.manual_seed(0)
    # timm layout: q, k, v are strided views into one (B, N, 3, H, D) projection output
    qkv = torch.randn(B, N, 3, H, D, device=device).to(dtype).requires_grad_(mode == "fwd_bwd")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scale = D ** -0.5
    do = torch.randn(B, H, N, D, device=device, dtype=dtype)

    def step():
        out = attn(q, k, v, scale)
        if mode == "fwd_bwd":
            torch.autograd.grad(out, qkv, do)

    try:
        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            err = (attn(q, k, v, scale).float() - ref).abs().max().item()
            step()  # first call pays one-off costs (autograd threads, workspaces) outside the peak
            with PeakMemory(device) as peak:
                step()
            ms = median_ms(step, device, warmup, iters)
    except Exception as e:  # noqa: BLE001 - a backend refusing a case is a result, not a crash
        row["error"] = failure_text(e)
        return row
    row.update(ms=ms, tflops=attention_flops(B, H, N, D, mode) / (ms * 1e-3) / 1e12,
               peak_mb=None if peak.bytes is None else peak.bytes / 2**20, max_abs_err=err)
    return row


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
            "dtype": "float32", "mode": "fwd_bwd", "device": "cpu", "ms": ms, "tflops": None, "peak_mb": None,
            "max_abs_err": (out - ref).abs().max().item(), "max_abs_grad_err": (g - g_ref).abs().max().item()}


def format_table(rows: list[dict], baseline: str) -> str:
    base = {(r["B"], r["H"], r["N"], r["D"], r["mode"]): r.get("ms") for r in rows if r["provider"] == baseline}
    head = (f"{'provider':<40} {'B':>3} {'H':>3} {'N':>5} {'D':>4} {'mode':<8} {'ms':>10} {'TFLOP/s':>8} "
            f"{'peak MB':>9} {'vs ' + baseline:>12} {'max|err|':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        key = (r["B"], r["H"], r["N"], r["D"], r["mode"])
        lead = f"{r['provider']:<40} {r['B']:>3} {r['H']:>3} {r['N']:>5} {r['D']:>4} {r['mode']:<8}"
        if "error" in r:
            lines.append(f"{lead} {'failed: ' + r['error']}")
            continue
        b = base.get(key)
        ratio = f"{b / r['ms']:.2f}x" if b and "INTERPRETER" not in r["provider"] else "-"
        tf = f"{r['tflops']:.3f}" if r.get("tflops") is not None else "-"
        pk = f"{r['peak_mb']:.1f}" if r.get("peak_mb") is not None else "-"
        lines.append(f"{lead} {r['ms']:>10.3f} {tf:>8} {pk:>9} {ratio:>12} {r['max_abs_err']:>9.2e}")
    return "\n".join(lines)


def ptxas_report(archs=(80, 90), head_dims=(64, 80, 128)) -> list[dict]:
    """Compile each attention kernel for each (arch, dtype, D) and read ``ptxas -v`` (needs no GPU)."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.attention import KERNELS, launch_configs

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    tensors = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
    rows = []
    for arch in archs:
        for dtype, ty in ((torch.float16, "*fp16"), (torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
            for d in head_dims:
                for name, (consts, warps, stages) in launch_configs(d, dtype).items():
                    fn = KERNELS[name]
                    sig = {a: "constexpr" if a in consts else ty if a in tensors else "*fp32" if a in ("LSE", "DELTA")
                           else "fp32" if a in ("qk_scale", "sm_scale") else "i32" for a in fn.arg_names}
                    # pointers and the row/batch/head strides of timm's layouts are multiples of 16 elements
                    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                             if sig[a].startswith("*") or (sig[a] == "i32" and a[0] == "s" and a[-1] != "d")}
                    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                            target=GPUTarget("cuda", arch, 32),
                                            options={"num_warps": warps, "num_stages": stages})
                    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                        f.write(kernel.asm["ptx"])
                        f.flush()
                        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
                        text = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                                              capture_output=True, text=True, check=True).stderr
                    rows.append({"arch": f"sm_{arch}", "dtype": str(dtype).replace("torch.", ""), "D": d,
                                 "kernel": name, "config": {**consts, "num_warps": warps, "num_stages": stages},
                                 "smem_bytes": kernel.metadata.shared,
                                 "registers": int(re.search(r"Used (\d+) registers", text).group(1)),
                                 "spill_bytes": int(re.search(r"(\d+) bytes spill stores", text).group(1))})
                    log.info("%s", rows[-1])
    return rows


def format_ptxas(rows: list[dict]) -> str:
    head = f"{'arch':<6} {'dtype':<9} {'D':>4} {'kernel':<15} {'tile (M x N, warps, stages)':<28} {'smem KB':>8} {'regs':>5} {'spill B':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r["config"]
        tile = f"{c['BLOCK_M']}x{c.get('BLOCK_N', '-')} w{c['num_warps']} s{c['num_stages']}"
        lines.append(f"{r['arch']:<6} {r['dtype']:<9} {r['D']:>4} {r['kernel']:<15} {tile:<28} "
                     f"{r['smem_bytes'] / 1024:>8.1f} {r['registers']:>5} {r['spill_bytes']:>8}")
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
    p.add_argument("--ptxas", action="store_true",
                   help="no timing: compile every kernel config for sm_80/sm_90 and report regs/spills/smem")
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
    if args.ptxas:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise UserError("--ptxas compiles real kernels: unset TRITON_INTERPRET")
        rows = ptxas_report()
        print(format_ptxas(rows))
        if args.out:
            atomic_write_text(args.out, json.dumps({"meta": {"triton": _triton_version()}, "rows": rows}, indent=2))
            print(f"wrote {args.out}")
        return 0
    device = args.device
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.attention imports triton
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    shapes = _parse_shapes(args.shapes) if args.shapes else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("fwd", "fwd_bwd") for m in modes):
        raise UserError(f"--modes {args.modes!r}: use fwd, fwd_bwd or both (comma separated)")
    table = providers(device, args.providers.split(",") if args.providers else None)
    baseline = args.baseline or ("sdpa-flash" if device == "cuda" else "reference")
    warmup, iters = default_iterations(device, args.warmup, args.iters)

    rss_exact = device == "cpu" and pin_mmap_threshold()
    rows = []
    for shape in shapes:
        ref = _reference_out(shape, dtype, device)
        for mode in modes:
            for name, attn in table.items():
                row = bench_case(name, attn, shape, dtype, mode, device, warmup, iters, ref)
                log.info("%s", row)
                rows.append(row)
        del ref
    if device == "cpu" and not args.no_interpreter_row:
        rows.append(interpreter_row(warmup))
    print(format_table(rows, baseline))
    for r in rows:
        if "max_abs_grad_err" in r:
            print(f"{r['provider']}: max |dq,dk,dv - reference| = {r['max_abs_grad_err']:.2e}")
    meta = {"device": device_label(device),
            "torch": torch.__version__, "dtype": str(dtype), "baseline": baseline, "warmup": warmup, "iters": iters,
            "flops_convention": "fwd 4*B*H*N^2*D; fwd_bwd 3.5x fwd",
            "peak_memory": peak_memory_method(device, rss_exact)}
    meta["triton"] = _triton_version()
    if args.out:
        atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    main()
