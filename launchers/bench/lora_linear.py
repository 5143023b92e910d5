"""LoRA linear benchmark: the torch backend, the reference, a merged-weight candidate, PEFT and Triton.

    python -m launchers.bench.lora_linear --out bench_lora.json                       # GPU: bf16, ViT-B/L
    python -m launchers.bench.lora_linear --device cpu --out bench_lora_cpu.json      # CPU: fp32
    python -m launchers.bench.lora_linear --device cpu --providers peft,merged,torch,reference

A case is one adapted linear layer of a ViT: M = batch x tokens rows, K -> N features, rank r, and
either LoRA on the whole output or (``qv``) adapters on the q and v thirds of the fused qkv
projection (N = 3*dim, ``segments=(0, 2*dim)``). Default cases follow issue 14: ViT-B/14 and
ViT-L/14, M = 514 and 2056 tokens on CPU (64 x 257 on a GPU), qkv(q,v), fc1, fc2 at r=64, proj at r=8.

Providers (all measured in one run, timings interleaved, see kernels.measure):
* ``torch`` -- ``kernels.lora_torch``, the default backend (addmm + in-place segment addmm_);
* ``reference`` -- ``kernels.reference``: slices and concatenates, autograd's backward;
* ``merged`` -- candidate (b), a merged weight (``launchers.bench.lora_merged``; no dropout);
* ``peft`` -- ``peft.tuners.lora.Linear`` (whole output only: PEFT has no adapters on slices of one
  Linear), when peft imports;
* ``triton`` -- ``kernels.lora_linear`` (CUDA; on CPU one tiny interpreter row, correctness only).
Per case and mode (``fwd``; ``fwd_bwd`` = forward plus gradients of x, A, B, W frozen): median ms,
TFLOP/s, bytes allocated during the call and its peak (each provider from a clean baseline after
warm-up), ratios to the baseline provider, and max |error| of the output against the fp32 reference.
``--cuda-graph`` adds CUDA-graph replay timings. FLOPs: fwd = 2MNK + 2M(K*S*r + S*n*r); fwd_bwd =
2x the base GEMM more (dx) and 3x the rank-r part.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

from engine.atomic import atomic_write_text  # noqa: E402
from engine.errors import UserError, cli_entry  # noqa: E402
from engine.progress import setup_logging  # noqa: E402
from kernels.measure import (default_iterations, device_label, failure_text, graph_median_ms,  # noqa: E402
                                   interleaved_medians, measure_memory, memory_method)
from kernels.reference import lora_linear_reference  # noqa: E402

log = logging.getLogger(__name__)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PROVIDERS = ("torch", "reference", "merged", "peft", "triton")


@dataclass(frozen=True)
class Case:
    """One adapted layer: x (M, K) -> (M, N), rank r; qv = adapters on q and v of a fused qkv."""
    layer: str
    M: int
    K: int
    N: int
    r: int
    qv: bool = False

    @property
    def segments(self) -> Optional[tuple[int, int]]:
        return (0, 2 * self.N // 3) if self.qv else None

    @property
    def n_seg(self) -> tuple[int, int]:
        return (2, self.N // 3) if self.qv else (1, self.N)

    def flops(self, mode: str) -> float:
        S, n = self.n_seg
        base = 2.0 * self.M * self.N * self.K
        low = 2.0 * self.M * (self.K * S * self.r + S * n * self.r)
        return base + low if mode == "fwd" else 2 * base + 3 * low


def vit_cases(dim: int, M: int, name: str) -> list[Case]:
    """The LoRA layers of one ViT block: qkv with q,v adapters, fc1, fc2 at r=64; proj at r=8."""
    return [Case(f"{name}.qkv(q,v)", M, dim, 3 * dim, 64, qv=True), Case(f"{name}.fc1", M, dim, 4 * dim, 64),
            Case(f"{name}.fc2", M, 4 * dim, dim, 64), Case(f"{name}.proj", M, dim, dim, 8)]


def default_cases(device: str) -> list[Case]:
    tokens = (64 * 257,) if device == "cuda" else (514, 2056)
    return [c for M in tokens for dim, name in ((768, "vitb"), (1024, "vitl")) for c in vit_cases(dim, M, name)]


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0):
    """x (M, K) requiring grad, frozen W (N, K) and b (N,), trainable A (S*r, K) and B (S*n, r) != 0."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    S, n = case.n_seg

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = rand(case.M, case.K).requires_grad_(True)
    w, b = rand(case.N, case.K, std=case.K ** -0.5), rand(case.N, std=0.1)
    a = rand(S * case.r, case.K, std=case.K ** -0.5).requires_grad_(True)
    bb = rand(S * n, case.r, std=case.r ** -0.5).requires_grad_(True)
    return x, w, b, a, bb


Forward = Callable[[], torch.Tensor]


def build_provider(name: str, case: Case, inputs, scale: float, p: float) -> tuple[Forward, list[torch.Tensor]]:
    """(forward closure, tensors whose gradients fwd_bwd computes)."""
    x, w, b, a, bb = inputs
    if name == "torch":
        from kernels.lora_torch import lora_linear_torch

        return (lambda: lora_linear_torch(x, w, b, a, bb, scale, p, True, case.segments)), [x, a, bb]
    if name == "reference":
        return (lambda: lora_linear_reference(x, w, b, a, bb, scale, p, True, case.segments)), [x, a, bb]
    if name == "merged":
        if p > 0:
            raise ValueError("a merged weight cannot apply dropout to the LoRA branch alone")
        from launchers.bench.lora_merged import lora_linear_merged

        return (lambda: lora_linear_merged(x, w, b, a, bb, scale, case.segments)), [x, a, bb]
    if name == "triton":
        from kernels.lora_linear import fused_lora_linear

        return (lambda: fused_lora_linear(x, w, b, a, bb, scale, p, True, case.segments)), [x, a, bb]
    if case.qv:
        raise ValueError("PEFT has no adapters on output slices of one Linear (q,v of a fused qkv)")
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    base = torch.nn.Linear(case.K, case.N, device=x.device, dtype=x.dtype)
    base.weight.data.copy_(w)
    base.bias.data.copy_(b)
    base.requires_grad_(False)
    alpha = scale * case.r  # PEFT's scaling is lora_alpha / r
    layer = PeftLinear(base, "default", LoraConfig(r=case.r, lora_alpha=alpha, lora_dropout=p),
                       r=case.r, lora_alpha=alpha).to(device=x.device, dtype=x.dtype).train()
    layer.lora_A["default"].weight.data.copy_(a)
    layer.lora_B["default"].weight.data.copy_(bb)
    return (lambda: layer(x)), [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def bench_case(names: list[str], case: Case, dtype: torch.dtype, mode: str, device: str, args) -> list[dict]:
    """Rows for every provider on one (case, mode): correctness, memory each from a clean baseline,
    then timings interleaved across the providers."""
    scale = 2.0
    inputs = make_inputs(case, dtype, device)
    dy = torch.randn(case.M, case.N, device=device, dtype=dtype)
    x, w, b, a, bb = (t.detach().float() for t in inputs)
    ref = lora_linear_reference(x, w, b, a, bb, scale, 0.0, False, case.segments) if args.dropout == 0 else None
    rows, steps = {}, {}
    for name in names:
        row = rows[name] = {"provider": name, **asdict(case), "dtype": str(dtype).replace("torch.", ""),
                            "mode": mode, "device": device, "dropout": args.dropout}
        try:
            forward, targets = build_provider(name, case, inputs, scale, args.dropout)

            def step(forward=forward, targets=targets):
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    out = forward()
                    if mode == "fwd_bwd":
                        torch.autograd.grad(out, targets, dy)

            if ref is not None:
                with torch.no_grad():
                    row["max_abs_err"] = (forward().float() - ref).abs().max().item()
            step()  # warm-up: one-off allocations (autograd engine, BLAS buffers) stay out of the figures
            row["alloc_mb"], row["peak_mb"] = (v / 2**20 for v in measure_memory(step, device))
            steps[name] = step
        except Exception as e:  # noqa: BLE001 - a provider refusing a case is a result, not a crash
            row["error"] = failure_text(e)
    del ref
    for name, ms in interleaved_medians(steps, device, args.warmup, args.iters).items():
        rows[name].update(ms=ms, tflops=case.flops(mode) / (ms * 1e-3) / 1e12)
    if args.cuda_graph:
        for name, step in steps.items():
            rows[name]["graph_ms"], rows[name]["graph_timing"] = graph_median_ms(step, args.iters)
    return list(rows.values())


def interpreter_row() -> dict:
    """CPU: the Triton kernel under TRITON_INTERPRET=1 on one tiny qv case, fwd+bwd vs reference (fp32)."""
    from kernels.lora_linear import fused_lora_linear

    case = Case("tiny.qkv(q,v)", 64, 64, 96, 8, qv=True)
    x, w, b, a, bb = make_inputs(case, torch.float32, "cpu")
    dy = torch.randn(case.M, case.N)
    t0 = time.perf_counter()
    y = fused_lora_linear(x, w, b, a, bb, 2.0, segments=case.segments)
    grads = torch.autograd.grad(y, [x, a, bb], dy)
    ms = (time.perf_counter() - t0) * 1e3
    ref = lora_linear_reference(x, w, b, a, bb, 2.0, segments=case.segments)
    ref_grads = torch.autograd.grad(ref, [x, a, bb], dy)
    return {"provider": "triton (INTERPRETER: correctness only)", **asdict(case), "dtype": "float32",
            "mode": "fwd_bwd", "device": "cpu", "dropout": 0.0, "ms": ms,
            "max_abs_err": (y - ref).abs().max().item(),
            "max_abs_grad_err": max((g - gr).abs().max().item() for g, gr in zip(grads, ref_grads))}


def _key(r: dict) -> tuple:
    return r["layer"], r["M"], r["K"], r["N"], r["r"], r["mode"]


def _ratio(num: Optional[float], den: Optional[float]) -> str:
    return f"{num / den:.2f}x" if num and den else "-"


def format_table(rows: list[dict], baseline: str) -> str:
    base = {_key(r): r for r in rows if r["provider"] == baseline and "ms" in r}
    head = (f"{'provider':<38} {'layer':<14} {'M':>5} {'K':>5} {'N':>5} {'r':>3} {'mode':<8} {'ms':>9} "
            f"{'TFLOP/s':>8} {'alloc MB':>8} {'peak MB':>8} {'speedup':>7} {'alloc':>6} {'peak':>6} {'max|err|':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = f"{r['provider']:<38} {r['layer']:<14} {r['M']:>5} {r['K']:>5} {r['N']:>5} {r['r']:>3} {r['mode']:<8}"
        if "error" in r:
            lines.append(f"{lead} n/a: {r['error']}")
            continue
        b = base.get(_key(r), {}) if "INTERPRETER" not in r["provider"] else {}
        tf = f"{r['tflops']:.3f}" if r.get("tflops") is not None else "-"
        al = f"{r['alloc_mb']:.1f}" if r.get("alloc_mb") is not None else "-"
        pk = f"{r['peak_mb']:.1f}" if r.get("peak_mb") is not None else "-"
        err = f"{r['max_abs_err']:.2e}" if r.get("max_abs_err") is not None else "-"
        graph = f"  graph {r['graph_ms']:.3f} ms ({r['graph_timing']})" if "graph_ms" in r else ""
        lines.append(f"{lead} {r['ms']:>9.3f} {tf:>8} {al:>8} {pk:>8} {_ratio(b.get('ms'), r['ms']):>7} "
                     f"{_ratio(r.get('alloc_mb'), b.get('alloc_mb')):>6} {_ratio(r.get('peak_mb'), b.get('peak_mb')):>6} "
                     f"{err:>9}{graph}")
    lines.append(f"speedup = {baseline} ms / provider ms; alloc, peak = provider / {baseline} "
                 "(bytes allocated during the call; peak live bytes above its start)")
    return "\n".join(lines)


def format_comparison(rows: list[dict], ours: str = "torch") -> str:
    """Per case: ``ours`` against each other provider (time ratio >1 = ours faster; bytes ratio <1 = ours smaller)."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if "ms" in r and "INTERPRETER" not in r["provider"]:
            by_key.setdefault(_key(r), {})[r["provider"]] = r
    lines = [f"{ours} vs each provider: time = their ms / {ours} ms; alloc, peak = {ours} bytes / theirs"]
    for key, provs in by_key.items():
        if ours not in provs:
            continue
        o = provs[ours]
        parts = [f"{p}: time {_ratio(r['ms'], o['ms'])} alloc {_ratio(o.get('alloc_mb'), r.get('alloc_mb'))} "
                 f"peak {_ratio(o.get('peak_mb'), r.get('peak_mb'))}" for p, r in provs.items() if p != ours]
        lines.append(f"  {key[0]:<14} M={key[1]:<5} r={key[4]:<3} {key[5]:<8} " + " | ".join(parts))
    return "\n".join(lines)


def _parse_cases(text: str) -> list[Case]:
    """'M,K,N,r[,qv];...' -> cases."""
    cases = []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        f = [s.strip() for s in part.split(",")]
        try:
            M, K, N, r = (int(v) for v in f[:4])
        except ValueError:
            M = 0
        qv = len(f) == 5 and f[4] == "qv"
        if M < 1 or min(K, N, r) < 1 or len(f) not in (4, 5) or (len(f) == 5 and not qv) or (qv and N % 3):
            raise UserError(f"--cases {text!r}: expected 'M,K,N,r' or 'M,K,N,r,qv' (N divisible by 3) groups "
                            "separated by ';', e.g. '12608,768,2304,8,qv'")
        cases.append(Case("custom" + (".qv" if qv else ""), M, K, N, r, qv))
    return cases


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--cases", default=None, help="'M,K,N,r[,qv];...' (default: the ViT-B/L set for the device)")
    p.add_argument("--providers", default=None, help=f"comma list of {', '.join(PROVIDERS)}, in the order "
                                                     "they are measured (default: all usable)")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout p (training mode) for every provider")
    p.add_argument("--warmup", type=int, default=None, help="default 10 on CUDA, 1 on CPU")
    p.add_argument("--iters", type=int, default=None, help="default 50 on CUDA, 5 on CPU")
    p.add_argument("--baseline", default="reference", help="provider the ratios are against")
    p.add_argument("--cuda-graph", action="store_true", help="CUDA: also time CUDA-graph replays")
    p.add_argument("--no-interpreter-row", action="store_true", help="CPU: skip the Triton-interpreter row")
    p.add_argument("--out", default=None, help="write the rows and run metadata as JSON here")
    return p.parse_args(argv)


@cli_entry
def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu")
    if args.cuda_graph and device != "cuda":
        raise UserError("--cuda-graph: CUDA graphs need --device cuda")
    if not 0.0 <= args.dropout < 1.0:
        raise UserError(f"--dropout {args.dropout}: must be in [0, 1)")
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    cases = _parse_cases(args.cases) if args.cases else default_cases(device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("fwd", "fwd_bwd") for m in modes):
        raise UserError(f"--modes {args.modes!r}: use fwd, fwd_bwd or both (comma separated)")
    has_peft = peft_available()
    if not has_peft:
        print("peft is not installed: the PEFT provider is skipped (pip install peft, or the 'bench' extra)")
    usable = [n for n in PROVIDERS if (n != "peft" or has_peft) and (n != "triton" or device == "cuda")]
    names = usable
    if args.providers:
        names = [n.strip() for n in args.providers.split(",") if n.strip()]
        bad = [n for n in names if n not in usable]
        if bad:
            raise UserError(f"--providers: {', '.join(bad)} not usable here (usable: {', '.join(usable)}; "
                            "triton needs CUDA, peft needs `pip install peft`)")
    args.warmup, args.iters = default_iterations(device, args.warmup, args.iters)

    rows = []
    for case in cases:
        for mode in modes:
            for row in bench_case(names, case, dtype, mode, device, args):
                log.info("%s", row)
                rows.append(row)
    if device == "cpu" and not args.no_interpreter_row:
        rows.append(interpreter_row())
    print(format_table(rows, args.baseline))
    print(format_comparison(rows))
    for r in rows:
        if "max_abs_grad_err" in r:
            print(f"{r['provider']}: max |dx, dA, dB - reference| = {r['max_abs_grad_err']:.2e}")
    meta = {"device": device_label(device), "torch": torch.__version__, "dtype": str(dtype),
            "providers": names, "baseline": args.baseline, "warmup": args.warmup, "iters": args.iters,
            "scale": 2.0, "dropout": args.dropout, "timing": "medians, providers interleaved per round",
            "flops": "fwd 2MNK + 2M(K*S*r + S*n*r); fwd_bwd 4MNK + 3*(rank-r part)",
            "memory": memory_method(device)}
    if args.out:
        atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    main()
