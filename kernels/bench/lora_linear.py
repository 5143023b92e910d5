"""LoRA linear microbenchmark: fused Triton kernel vs unfused torch (the reference) vs PEFT's LoRA layer.

    python -m kernels.bench.lora_linear --out bench_lora.json              # GPU: ViT-B/L sweep, bf16
    python -m kernels.bench.lora_linear --device cpu --out bench_lora_cpu.json

A case is one adapted linear layer of a ViT: M = batch x tokens rows, K -> N features, rank r, and
either plain LoRA on the whole output or (``qv``) adapters on the q and v thirds of the fused qkv
projection (N = 3*dim, ``segments=(0, 2*dim)``). Per case and mode (``fwd``; ``fwd_bwd`` = forward
plus gradients of x, A, B with W frozen) it reports the median time, TFLOP/s, the peak memory above
the inputs, the speedup over the baseline provider (default ``reference``) and the max |error| of
the output against the fp32 reference. FLOPs: fwd = 2MNK + 2M(K*S*r + S*n*r) (base GEMM plus the two
rank-r GEMMs); fwd_bwd = 2x the base GEMM more (dx) and 3x the rank-r part.

Providers: ``reference`` (kernels.reference, three extra GEMMs and the (M, r) / dropout tensors in
torch), ``triton`` (kernels.lora_linear; CUDA only), ``peft`` (``peft.tuners.lora.Linear``; when
peft imports -- ``pip install peft``, the ``bench`` extra -- and only for plain LoRA: PEFT has no
adapters on output slices of one Linear). On CPU the ``triton`` provider runs only as one tiny
interpreter row (TRITON_INTERPRET=1): correctness only, its time is NOT a performance figure.
Peak memory: CUDA ``max_memory_allocated``; CPU the process's peak-RSS increase (Linux).
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
from kernels.bench.measure import (PeakMemory, default_iterations, device_label, failure_text,  # noqa: E402
                                   median_ms, peak_memory_method, pin_mmap_threshold)
from kernels.reference import lora_linear_reference  # noqa: E402

log = logging.getLogger(__name__)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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


def vit_cases(dim: int, tokens: int, batch: int, ranks: list[int], name: str) -> list[Case]:
    M = tokens * batch
    cases = []
    for r in ranks:
        cases += [Case(f"{name}.qkv(q,v)", M, dim, 3 * dim, r, qv=True), Case(f"{name}.proj", M, dim, dim, r),
                  Case(f"{name}.fc1", M, dim, 4 * dim, r), Case(f"{name}.fc2", M, 4 * dim, dim, r)]
    return cases


def default_cases(device: str) -> list[Case]:
    if device == "cuda":  # ViT-B/16 at 224 px (197 tokens), ViT-L/14 at 224 px (257 tokens), batch 64
        return vit_cases(768, 197, 64, [8, 64], "vitb") + vit_cases(1024, 257, 64, [8, 16, 64], "vitl")
    # 2 shared CPU cores: a few ViT-B/L layers at 2 images, enough for ratios measured in one run
    return [Case("vitb.proj", 394, 768, 768, 8), Case("vitb.proj", 394, 768, 768, 32),
            Case("vitb.fc1", 394, 768, 3072, 16), Case("vitl.fc2", 514, 4096, 1024, 64),
            Case("vitl.qkv(q,v)", 514, 1024, 3072, 16, qv=True)]


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
    if name == "reference":
        return (lambda: lora_linear_reference(x, w, b, a, bb, scale, p, True, case.segments)), [x, a, bb]
    if name == "triton":
        from kernels.lora_linear import fused_lora_linear

        return (lambda: fused_lora_linear(x, w, b, a, bb, scale, p, True, case.segments)), [x, a, bb]
    if name == "peft":
        if case.qv:
            raise UserError("PEFT has no adapters on output slices of one Linear (q,v of a fused qkv)")
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
    raise UserError(f"--providers: unknown provider {name!r}; choose from reference, triton, peft")


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def bench_case(name: str, case: Case, dtype: torch.dtype, mode: str, device: str, args) -> dict:
    row = {"provider": name, **asdict(case), "dtype": str(dtype).replace("torch.", ""), "mode": mode,
           "device": device, "dropout": args.dropout}
    scale = 2.0
    try:
        inputs = make_inputs(case, dtype, device)
        forward, targets = build_provider(name, case, inputs, scale, args.dropout)
        dy = torch.randn(case.M, case.N, device=device, dtype=dtype)

        def step():
            out = forward()
            if mode == "fwd_bwd":
                torch.autograd.grad(out, targets, dy)

        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            if args.dropout == 0.0:
                x, w, b, a, bb = (t.detach().float() for t in inputs)
                ref = lora_linear_reference(x, w, b, a, bb, scale, 0.0, False, case.segments)
                row["max_abs_err"] = (forward().float() - ref).abs().max().item()
                del ref
            with PeakMemory(device) as peak:
                step()
            ms = median_ms(step, device, args.warmup, args.iters)
    except Exception as e:  # noqa: BLE001 - a provider refusing a case is a result, not a crash
        row["error"] = failure_text(e)
        return row
    row.update(ms=ms, tflops=case.flops(mode) / (ms * 1e-3) / 1e12,
               peak_mb=None if peak.bytes is None else peak.bytes / 2**20)
    return row


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
            "mode": "fwd_bwd", "device": "cpu", "dropout": 0.0, "ms": ms, "tflops": None, "peak_mb": None,
            "max_abs_err": (y - ref).abs().max().item(),
            "max_abs_grad_err": max((g - gr).abs().max().item() for g, gr in zip(grads, ref_grads))}


def format_table(rows: list[dict], baseline: str) -> str:
    def key(r):
        return r["layer"], r["M"], r["K"], r["N"], r["r"], r["mode"]

    base = {key(r): r for r in rows if r["provider"] == baseline and "ms" in r}
    head = (f"{'provider':<38} {'layer':<14} {'M':>6} {'K':>5} {'N':>5} {'r':>3} {'mode':<8} {'ms':>9} "
            f"{'TFLOP/s':>8} {'peak MB':>8} {'speedup':>8} {'mem':>6} {'max|err|':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = (f"{r['provider']:<38} {r['layer']:<14} {r['M']:>6} {r['K']:>5} {r['N']:>5} {r['r']:>3} "
                f"{r['mode']:<8}")
        if "error" in r:
            lines.append(f"{lead} n/a: {r['error']}")
            continue
        b = base.get(key(r))
        interp = "INTERPRETER" in r["provider"]
        speed = f"{b['ms'] / r['ms']:.2f}x" if b and not interp else "-"
        mem = (f"{r['peak_mb'] / b['peak_mb']:.2f}x" if b and not interp and r.get("peak_mb") and b.get("peak_mb")
               else "-")
        tf = f"{r['tflops']:.3f}" if r.get("tflops") is not None else "-"
        pk = f"{r['peak_mb']:.1f}" if r.get("peak_mb") is not None else "-"
        err = f"{r['max_abs_err']:.2e}" if r.get("max_abs_err") is not None else "-"
        lines.append(f"{lead} {r['ms']:>9.3f} {tf:>8} {pk:>8} {speed:>8} {mem:>6} {err:>9}")
    lines.append(f"speedup = {baseline} ms / provider ms; mem = provider peak / {baseline} peak")
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
    p.add_argument("--providers", default=None, help="comma list of reference, triton, peft (default: all usable)")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout p (training mode) for every provider")
    p.add_argument("--warmup", type=int, default=None, help="default 10 on CUDA, 1 on CPU")
    p.add_argument("--iters", type=int, default=None, help="default 50 on CUDA, 5 on CPU")
    p.add_argument("--baseline", default="reference", help="provider the speedups are against")
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
    names = ["reference"] + (["triton"] if device == "cuda" else []) + (["peft"] if has_peft else [])
    if args.providers:
        wanted = [n.strip() for n in args.providers.split(",") if n.strip()]
        bad = [n for n in wanted if n not in names]
        if bad:
            raise UserError(f"--providers: {', '.join(bad)} not usable here (usable: {', '.join(names)}; "
                            "triton needs CUDA, peft needs `pip install peft`)")
        names = wanted
    args.warmup, args.iters = default_iterations(device, args.warmup, args.iters)

    rss_exact = device == "cpu" and pin_mmap_threshold()
    rows = []
    for case in cases:
        for mode in modes:
            for name in names:
                row = bench_case(name, case, dtype, mode, device, args)
                log.info("%s", row)
                rows.append(row)
    if device == "cpu" and not args.no_interpreter_row:
        rows.append(interpreter_row())
    print(format_table(rows, args.baseline))
    for r in rows:
        if "max_abs_grad_err" in r:
            print(f"{r['provider']}: max |dx, dA, dB - reference| = {r['max_abs_grad_err']:.2e}")
    meta = {"device": device_label(device),
            "torch": torch.__version__, "dtype": str(dtype), "baseline": args.baseline, "warmup": args.warmup,
            "iters": args.iters, "scale": 2.0, "peft": has_peft,
            "flops": "fwd 2MNK + 2M(K*S*r + S*n*r); fwd_bwd 4MNK + 3*(rank-r part)",
            "peak_memory": peak_memory_method(device, rss_exact)}
    if args.out:
        atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    main()
