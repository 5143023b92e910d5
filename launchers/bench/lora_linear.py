"""LoRA linear benchmark: the torch backend, the reference, a merged-weight candidate, PEFT and Triton.

    python -m launchers.bench.lora_linear --out bench_lora.json                       # GPU: bf16, ViT-B/L
    python -m launchers.bench.lora_linear --device cpu --out bench_lora_cpu.json      # CPU: fp32
    python -m launchers.bench.lora_linear --device cpu --providers peft,merged,torch,reference

A case is one adapted linear layer of a ViT: M = batch x tokens rows, K -> N features, rank r, and
either LoRA on the whole output or (``qv``) adapters on the q and v thirds of the fused qkv
projection (N = 3*dim, ``segments=(0, 2*dim)``). Default cases follow issue 14: ViT-B/14 and
ViT-L/14, M = 514 and 2056 tokens on CPU (64 x 257 on a GPU), qkv(q,v), fc1, fc2 at r=64, proj at r=8.

Providers (all measured in one run, timings interleaved, see launchers.bench.harness):
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

import os
from dataclasses import asdict, dataclass

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

from engine.errors import UserError, cli_entry
from engine.progress import setup_logging
from kernels.reference import lora_linear_reference
from launchers.bench import harness
from launchers.bench.harness import Column

PROVIDERS = ("torch", "reference", "merged", "peft", "triton")
KEYS = ("layer", "M", "K", "N", "r", "mode")


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
    def segments(self) -> tuple[int, int] | None:
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
    return [
        Case(f"{name}.qkv(q,v)", M, dim, 3 * dim, 64, qv=True),
        Case(f"{name}.fc1", M, dim, 4 * dim, 64),
        Case(f"{name}.fc2", M, 4 * dim, dim, 64),
        Case(f"{name}.proj", M, dim, dim, 8),
    ]


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
    w, b = rand(case.N, case.K, std=case.K**-0.5), rand(case.N, std=0.1)
    a = rand(S * case.r, case.K, std=case.K**-0.5).requires_grad_(True)
    bb = rand(S * n, case.r, std=case.r**-0.5).requires_grad_(True)
    return x, w, b, a, bb


def build_provider(name: str, case: Case, inputs, scale: float, p: float) -> tuple[harness.Forward, list[torch.Tensor]]:
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
    config = LoraConfig(r=case.r, lora_alpha=alpha, lora_dropout=p)
    layer = PeftLinear(base, "default", config, r=case.r, lora_alpha=alpha)
    layer = layer.to(device=x.device, dtype=x.dtype).train()
    layer.get_parameter("lora_A.default.weight").data.copy_(a)
    layer.get_parameter("lora_B.default.weight").data.copy_(bb)
    return (lambda: layer(x)), [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def bench_case(names: list[str], case: Case, dtype: torch.dtype, mode: str, device: str, args) -> list[dict]:
    """Rows for every provider on one (case, mode), measured by the harness against the fp32 reference."""
    scale = 2.0
    inputs = make_inputs(case, dtype, device)
    dy = torch.randn(case.M, case.N, device=device, dtype=dtype)
    x, w, b, a, bb = (t.detach().float() for t in inputs)
    ref = lora_linear_reference(x, w, b, a, bb, scale, 0.0, False, case.segments) if args.dropout == 0 else None
    builders = {n: (lambda n=n: build_provider(n, case, inputs, scale, args.dropout)) for n in names}
    row = {
        **asdict(case),
        "dtype": str(dtype).replace("torch.", ""),
        "mode": mode,
        "device": device,
        "dropout": args.dropout,
    }
    return harness.measure_providers(
        builders,
        row,
        mode=mode,
        grad_out=dy,
        reference=ref,
        device=device,
        warmup=args.warmup,
        iters=args.iters,
        flops=case.flops(mode),
        cuda_graph=args.cuda_graph,
    )


def interpreter_row() -> dict:
    """CPU: the Triton kernel under TRITON_INTERPRET=1 on one tiny qv case, fwd+bwd vs reference (fp32)."""
    from kernels.lora_linear import fused_lora_linear

    case = Case("tiny.qkv(q,v)", 64, 64, 96, 8, qv=True)
    x, w, b, a, bb = make_inputs(case, torch.float32, "cpu")
    return harness.interpreter_row(
        lambda: fused_lora_linear(x, w, b, a, bb, 2.0, segments=case.segments),
        lambda: lora_linear_reference(x, w, b, a, bb, 2.0, segments=case.segments),
        [x, a, bb],
        torch.randn(case.M, case.N),
        {**asdict(case), "dtype": "float32", "mode": "fwd_bwd", "device": "cpu", "dropout": 0.0},
    )


def columns(rows: list[dict], baseline: str) -> list[Column]:
    base = harness.baseline_of(rows, baseline, KEYS)
    return [
        Column("provider", "provider", left=True),
        Column("layer", "layer", left=True),
        Column("M", "M"),
        Column("K", "K"),
        Column("N", "N"),
        Column("r", "r"),
        Column("mode", "mode", left=True),
        Column("ms", "ms", "{:.3f}"),
        Column("TFLOP/s", "tflops", "{:.3f}"),
        Column("alloc MB", "alloc_mb", "{:.1f}"),
        Column("peak MB", "peak_mb", "{:.1f}"),
        Column("speedup", lambda r: harness.ratio(base(r).get("ms"), r.get("ms")), "{:.2f}x"),
        Column("alloc", lambda r: harness.ratio(r.get("alloc_mb"), base(r).get("alloc_mb")), "{:.2f}x"),
        Column("peak", lambda r: harness.ratio(r.get("peak_mb"), base(r).get("peak_mb")), "{:.2f}x"),
        Column("max|err|", "max_abs_err", "{:.2e}"),
        Column(
            "graph ms",
            lambda r: f"{r['graph_ms']:.3f} ({r['graph_timing']})" if "graph_ms" in r else None,
            left=True,
            optional=True,
        ),
    ]


def format_table(rows: list[dict], baseline: str) -> str:
    return (
        harness.format_table(rows, columns(rows, baseline), lead=len(KEYS) + 1)
        + f"\nspeedup = {baseline} ms / provider ms; alloc, peak = provider / {baseline} "
        "(bytes allocated during the call; peak live bytes above its start)"
    )


def format_comparison(rows: list[dict], ours: str = "torch") -> str:
    """Per case: ``ours`` against each other provider (time ratio >1 = ours faster; bytes ratio <1 = ours smaller)."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if "ms" in r and r["provider"] != harness.INTERPRETER:
            by_key.setdefault(tuple(r[k] for k in KEYS), {})[r["provider"]] = r
    lines = [f"{ours} vs each provider: time = their ms / {ours} ms; alloc, peak = {ours} bytes / theirs"]

    def x(v: float | None) -> str:
        return f"{v:.2f}x" if v is not None else "-"

    for key, provs in by_key.items():
        if ours not in provs:
            continue
        o = provs[ours]
        parts = [
            f"{p}: time {x(harness.ratio(r['ms'], o['ms']))} "
            f"alloc {x(harness.ratio(o.get('alloc_mb'), r.get('alloc_mb')))} "
            f"peak {x(harness.ratio(o.get('peak_mb'), r.get('peak_mb')))}"
            for p, r in provs.items()
            if p != ours
        ]
        lines.append(f"  {key[0]:<14} M={key[1]:<5} r={key[4]:<3} {key[5]:<8} " + " | ".join(parts))
    return "\n".join(lines)


def _parse_cases(text: str) -> list[Case]:
    """'M,K,N,r[,qv];...' -> cases."""
    groups = [g.strip() for g in text.split(";") if g.strip()]
    qv = [g.replace(" ", "").endswith(",qv") for g in groups]
    example = "12608,768,2304,8,qv"
    nums = harness.int_groups(";".join(g.replace(" ", "").removesuffix(",qv") for g in groups), "--cases", 4, example)
    if any(q and N % 3 for q, (_, _, N, _) in zip(qv, nums)):
        raise UserError(f"--cases {text!r}: a 'qv' case needs N divisible by 3 (q, k, v thirds), e.g. {example!r}")
    return [Case("custom" + (".qv" if q else ""), M, K, N, r, q) for q, (M, K, N, r) in zip(qv, nums)]


def parse_args(argv: list[str] | None = None):
    p = harness.parser(__doc__, "python -m launchers.bench.lora_linear")
    harness.kernel_flags(p)
    p.add_argument("--cases", default=None, help="'M,K,N,r[,qv];...' (default: the ViT-B/L set for the device)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout p (training mode) for every provider")
    p.add_argument("--baseline", default="reference", help="provider the ratios are against")
    return p.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    dtype = harness.kernel_settings(args)
    device = args.device
    if not 0.0 <= args.dropout < 1.0:
        raise UserError(f"--dropout {args.dropout}: must be in [0, 1)")
    cases = _parse_cases(args.cases) if args.cases else default_cases(device)
    has_peft = peft_available()
    if not has_peft:
        print("peft is not installed: the PEFT provider is skipped (pip install peft, or the 'bench' extra)")
    usable = [n for n in PROVIDERS if (n != "peft" or has_peft) and (n != "triton" or device == "cuda")]
    names = (
        usable
        if not args.providers
        else harness.comma_list(
            args.providers, "--providers", usable, hint="triton needs CUDA, peft needs `pip install peft`"
        )
    )
    record = harness.start("lora_linear", args, device)
    rows = [row for case in cases for mode in args.modes for row in bench_case(names, case, dtype, mode, device, args)]
    harness.kernel_report(
        args,
        record,
        rows,
        interpreter_row,
        lambda rows: format_table(rows, args.baseline) + "\n" + format_comparison(rows),
        "dx, dA, dB",
        dtype,
        args.baseline,
        providers=names,
        scale=2.0,
        dropout=args.dropout,
        flops="fwd 2MNK + 2M(K*S*r + S*n*r); fwd_bwd 4MNK + 3*(rank-r part)",
    )
    return 0


if __name__ == "__main__":
    main()
