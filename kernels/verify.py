"""Measure the Triton kernels on this GPU and record where ``auto`` may use them. Run once per machine.

    python -m kernels.verify                        # or: geoexplora-verify-kernels
    python -m kernels.verify --models vitl --ranks 64 --tokens 16448 --record /shared/kernels.json

For every shape class of the model's layers (``kernels.record``: ViT-B/14 and ViT-L/14 LoRA layers
-- qkv with q,v adapters, proj, fc1, fc2 -- at each rank and row count, and attention at the crops'
sequence lengths) it runs:

1. parity: the Triton kernel against the fp32 reference on the same inputs, forward and every
   gradient (LoRA also with dropout, against the reference given the kernel's own mask); relative
   error under the dtype's tolerance;
2. speed: forward + backward, the kernel and the path ``auto`` would otherwise take (the fast torch
   LoRA path, PyTorch SDPA), timed interleaved (median).

The entries go into the kernel record (``$GEOEXPLORA_KERNEL_RECORD``, else
``~/.cache/geoexplora/kernels.json``) under this device model and these torch/triton versions;
other machines' entries are kept. ``auto`` then takes the kernel only where it passed and was at
least ``kernels.record.MIN_SPEEDUP`` times as fast. ``--interpret`` checks this command's plumbing on
CPU (Triton interpreter, tiny shapes, fp32); its record is never used for a choice.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from engine.atomic import atomic_write_text
from engine.errors import UserError, cli_entry
from engine.progress import setup_logging

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODELS = {"vitb": (768, 12), "vitl": (1024, 16)}  # ViT-B/14, ViT-L/14: width, heads (head dim 64)
# Rows of one LoRA GEMM, one per class of kernels.record.M_CLASSES: 8 / 64 / 256 images x 257 tokens
TOKENS = (2056, 16448, 65792)
SEQ_LENS = (50, 197, 257, 1025)  # local crops 98 px / 14; 224 px / 16; 224 px / 14; 448 px / 14
# Relative error (Frobenius norm) allowed against the fp32 reference
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], dout: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, dout))


def lora_parity(M: int, K: int, N: int, r: int, segments, dtype, device, p: float) -> float:
    """Max relative error of y, dx, dA, dB: the fused kernel vs the fp32 reference (dropout: same mask)."""
    from kernels.lora_linear import fused_lora_linear, lora_dropout_mask
    from kernels.reference import lora_linear_reference

    x, w, b, a, bb = _lora_inputs(M, K, N, r, segments, dtype, device)
    y = fused_lora_linear(x, w, b, a, bb, 2.0, p, p > 0, segments, seed=1234)
    dy = torch.randn_like(y)
    got = [y.detach(), *_grads(y, [x, a, bb], dy)]
    ref_in = [t.detach().float().requires_grad_(t.requires_grad) for t in (x, w, b, a, bb)]
    mask = lora_dropout_mask(1234, x.shape, p, device) if p > 0 else None
    rx, rw, rb, ra, rbb = ref_in
    y_ref = lora_linear_reference(rx, rw, rb, ra, rbb, 2.0, p, p > 0, segments, dropout_mask=mask)
    want = [y_ref.detach(), *_grads(y_ref, [rx, ra, rbb], dy.float())]
    return max(_rel(g, w_) for g, w_ in zip(got, want))


def _lora_parity_with_and_without_dropout(M, K, N, r, segments, dtype, device) -> float:
    return max(
        lora_parity(M, K, N, r, segments, dtype, device, 0.0), lora_parity(M, K, N, r, segments, dtype, device, 0.1)
    )


def _lora_inputs(M, K, N, r, segments, dtype, device):
    S = 1 if segments is None else len(segments)
    n = N if segments is None else N // 3
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, std=1.0, grad=False):
        return (torch.randn(*shape, generator=g) * std).to(device, dtype).requires_grad_(grad)

    return (
        rand(M, K, grad=True),
        rand(N, K, std=K**-0.5),
        rand(N, std=0.1),
        rand(S * r, K, std=K**-0.5, grad=True),
        rand(S * n, r, std=r**-0.5, grad=True),
    )


def lora_steps(M, K, N, r, segments, dtype, device) -> dict[str, Callable[[], None]]:
    """fwd+bwd closures: the Triton kernel and the torch path auto uses without a record."""
    from kernels.lora_linear import fused_lora_linear
    from kernels.lora_torch import lora_linear_torch

    x, w, b, a, bb = _lora_inputs(M, K, N, r, segments, dtype, device)
    dy = torch.randn(M, N, device=device, dtype=dtype)

    def step(fn):
        return lambda: torch.autograd.grad(fn(x, w, b, a, bb, 2.0, 0.0, True, segments), [x, a, bb], dy)

    return {"kernel": step(fused_lora_linear), "baseline": step(lora_linear_torch)}


def _qkv(B, H, N, D, dtype, device):
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, device=device).to(dtype).requires_grad_(True)
    return qkv, qkv.permute(2, 0, 3, 1, 4).unbind(0)  # timm's strided q, k, v views


def attention_parity(B, H, N, D, dtype, device) -> float:
    from kernels.attention import flash_attention
    from kernels.reference import attention_reference

    qkv, (q, k, v) = _qkv(B, H, N, D, dtype, device)
    out = flash_attention(q, k, v)
    do = torch.randn_like(out)
    got = [out.detach(), *_grads(out, [qkv], do)]
    ref_qkv = qkv.detach().float().requires_grad_(True)
    ref = attention_reference(*ref_qkv.permute(2, 0, 3, 1, 4).unbind(0))
    want = [ref.detach(), *_grads(ref, [ref_qkv], do.float())]
    return max(_rel(g, w_) for g, w_ in zip(got, want))


def attention_steps(B, H, N, D, dtype, device) -> dict[str, Callable[[], None]]:
    from kernels.attention import flash_attention

    qkv, (q, k, v) = _qkv(B, H, N, D, dtype, device)
    do = torch.randn(B, H, N, D, device=device, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {
        "kernel": lambda: torch.autograd.grad(flash_attention(q, k, v), qkv, do),
        "baseline": lambda: torch.autograd.grad(sdpa(q, k, v), qkv, do),
    }


def lora_shapes(models: dict, ranks, tokens) -> list[tuple]:
    """(label, M, K, N, r, segments) of each adapted layer of each model (name -> (width, heads))."""
    shapes = []
    for m, (d, _) in models.items():
        for M in tokens:
            for r in ranks:
                shapes += [
                    (f"{m}.qkv(q,v)", M, d, 3 * d, r, (0, 2 * d)),
                    (f"{m}.proj", M, d, d, r, None),
                    (f"{m}.fc1", M, d, 4 * d, r, None),
                    (f"{m}.fc2", M, 4 * d, d, r, None),
                ]
    return shapes


def verify(args, dtypes, device) -> dict:
    """shape class -> record entry, printing one line per class as it goes."""
    from kernels import record
    from kernels.measure import interleaved_medians

    entries = {}
    # (shape class, label, baseline, parity() -> max rel err, steps() -> {provider: step}, dtype)
    jobs: list[tuple[str, str, str, Callable[[], float], Callable[[], Mapping[str, Callable[[], object]]], torch.dtype]]
    jobs = []
    for dtype in dtypes:
        if "lora" in args.ops:
            for label, M, K, N, r, segs in lora_shapes(args.models, args.ranks, args.tokens):
                cls = record.lora_class(M, K, N, r, 1 if segs is None else len(segs), dtype)
                shape = (M, K, N, r, segs, dtype, device)
                jobs.append(
                    (
                        cls,
                        label,
                        "torch",
                        functools.partial(_lora_parity_with_and_without_dropout, *shape),
                        functools.partial(lora_steps, *shape),
                        dtype,
                    )
                )
        if "attention" in args.ops:
            for N in args.seq_lens:
                for m, (_, H) in args.models.items():
                    B = max(1, args.attention_tokens // N)
                    cls = record.attention_class(N, 64, dtype)
                    jobs.append(
                        (
                            cls,
                            f"{m} attn N={N} B={B}",
                            "sdpa",
                            functools.partial(attention_parity, B, H, N, 64, dtype, device),
                            functools.partial(attention_steps, B, H, N, 64, dtype, device),
                            dtype,
                        )
                    )
    print(f"{'shape class':<48} {'case':<22} {'rel err':>8} {'kernel ms':>10} {'baseline ms':>12} {'speedup':>8}")
    for cls, label, baseline, parity, steps, dtype in jobs:
        if cls in entries:  # two models with one class (e.g. attention at equal N): the first decides
            continue
        t0 = time.perf_counter()
        try:
            err = parity()
            ms = interleaved_medians(steps(), device.type, args.warmup, args.iters)
            entry = {
                "passed": err <= TOL[dtype],
                "max_rel_err": err,
                "kernel_ms": ms["kernel"],
                "baseline": baseline,
                "baseline_ms": ms["baseline"],
                "speedup": ms["baseline"] / ms["kernel"],
            }
        except Exception as e:  # noqa: BLE001 - a kernel that fails to run is recorded as not passed
            entry = {
                "passed": False,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                "speedup": 0.0,
            }
        entry.update(case=label, seconds=round(time.perf_counter() - t0, 1))
        entries[cls] = entry
        if "error" in entry:
            print(f"{cls:<48} {label:<22} FAILED: {entry['error']}", flush=True)
        else:
            verdict = "" if entry["passed"] else "  FAILED parity"
            print(
                f"{cls:<48} {label:<22} {entry['max_rel_err']:>8.1e} {entry['kernel_ms']:>10.3f} "
                f"{entry['baseline_ms']:>12.3f} {entry['speedup']:>7.2f}x{verdict}",
                flush=True,
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return entries


def _csv(text: str, cast=str) -> list:
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="lora,attention", help="comma list of lora, attention")
    p.add_argument("--models", default="vitb,vitl", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--dtypes", default="bf16", help=f"comma list of {', '.join(DTYPES)} (training runs bf16)")
    p.add_argument("--ranks", default="8,64", help="LoRA ranks to measure (a class covers r up to a power of 2)")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="LoRA GEMM rows (batch x tokens)")
    p.add_argument("--seq-lens", default=",".join(map(str, SEQ_LENS)), help="attention sequence lengths")
    p.add_argument("--attention-tokens", type=int, default=16448, help="attention batch = this // N")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--record",
        default=None,
        help="record file (default: $GEOEXPLORA_KERNEL_RECORD or ~/.cache/geoexplora/kernels.json)",
    )
    p.add_argument("--interpret", action="store_true", help="CPU plumbing check under the Triton interpreter")
    return p.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    setup_logging()
    try:
        args.ops = _csv(args.ops)
        args.models = {m: MODELS[m] for m in _csv(args.models)}
        dtypes = [DTYPES[d] for d in _csv(args.dtypes)]
        args.ranks, args.tokens, args.seq_lens = _csv(args.ranks, int), _csv(args.tokens, int), _csv(args.seq_lens, int)
    except (KeyError, ValueError) as e:
        raise UserError(f"--models/--dtypes/--ranks/--tokens/--seq-lens: cannot read {e}; see --help") from None
    if not args.ops or not set(args.ops) <= {"lora", "attention"}:
        raise UserError(f"--ops {','.join(args.ops)}: use lora, attention or both")
    from kernels import record

    if args.interpret:
        if torch.cuda.is_available():
            raise UserError("--interpret: this machine has a GPU; run without it to measure the kernels")
        device = torch.device("cpu")
        # tiny and fp32: the interpreter runs every program in Python, and its bf16 tl.dot is broken
        dtypes, args.models, args.ranks, args.tokens, args.seq_lens = (
            [torch.float32],
            {"tiny": (32, 2)},
            [8],
            [64],
            [17],
        )
        args.attention_tokens, args.warmup, args.iters = 34, 0, 1
        info = {
            "device": "cpu (Triton interpreter)",
            "capability": [0, 0],
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
        }
    else:
        if not torch.cuda.is_available():
            raise UserError(
                "no CUDA device: kernels.verify measures the Triton kernels on a GPU (on CPU, "
                "auto always takes the torch path and SDPA); --interpret checks the plumbing"
            )
        device = torch.device("cuda", torch.cuda.current_device())
        info = record.device_info(device)
    path = record.record_path() if args.record is None else Path(args.record).expanduser()
    print(
        f"verifying kernels on {info['device']} (sm{info['capability'][0]}{info['capability'][1]}, "
        f"torch {info['torch']}, triton {info['triton']}) -> {path}",
        flush=True,
    )
    entries = verify(args, dtypes, device)
    data = record.merge_entries(
        record.load_record(path), info, entries, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
    chosen = sum(record.kernel_allowed(data, record.machine_key(info), c) for c in entries)
    failed = sum(not e["passed"] for e in entries.values())
    print(
        f"wrote {path}: {len(entries)} shape classes, auto takes the Triton kernel for {chosen}; "
        f"{failed} failed parity or did not run"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
