"""Attention microbenchmark: our Triton flash kernel vs PyTorch SDPA backends vs xformers vs reference.

    python -m launchers.bench.attention --out bench_attention.json            # GPU: ViT-B/L shapes
    python -m launchers.bench.attention --device cpu --out bench_attention_cpu.json

Per shape (B, H, N, D) and mode (``fwd``, ``fwd_bwd``): median time (providers interleaved, see
launchers.bench.harness), TFLOP/s, bytes allocated during the call and its peak (each provider from a
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

import os
from collections.abc import Callable

import torch

from engine.errors import cli_entry
from engine.progress import setup_logging
from kernels.reference import attention_reference
from launchers.bench import harness
from launchers.bench.harness import Column

GPU_SHAPES = [  # (B, H, N, D): ViT-B (12 heads) and ViT-L (16 heads), 224/256/512 px at patch 16
    (64, 12, 197, 64),
    (64, 12, 257, 64),
    (16, 12, 1025, 64),
    (64, 16, 197, 64),
    (64, 16, 257, 64),
    (16, 16, 1025, 64),
]
CPU_SHAPES = [(4, 12, 197, 64), (2, 12, 257, 64), (1, 12, 1025, 64)]
INTERPRETER_SHAPE = (1, 2, 197, 64)
KEYS = ("B", "H", "N", "D", "mode")
Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _sdpa(backend: str | None) -> Attn:
    def run(q, k, v, scale):
        if backend is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend)):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    return run


def _xformers(q, k, v, scale):
    import xformers.ops as xops

    return xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    ).transpose(1, 2)


def _triton(q, k, v, scale):
    from kernels.attention import flash_attention

    return flash_attention(q, k, v, scale)


def providers(device: str, names: str | None) -> dict[str, Attn]:
    from kernels.dispatch import xformers_available

    table: dict[str, Attn] = {"reference": attention_reference, "sdpa": _sdpa(None)}
    if device == "cuda":
        table.update(
            {
                "sdpa-flash": _sdpa("FLASH_ATTENTION"),
                "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
                "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
                "sdpa-math": _sdpa("MATH"),
                "triton": _triton,
            }
        )
        if xformers_available():
            table["xformers"] = _xformers
    if names:
        table = {
            n: table[n]
            for n in harness.comma_list(
                names, "--providers", list(table), hint=f"these are the ones available on {device}"
            )
        }
    return table


def attention_flops(B: int, H: int, N: int, D: int, mode: str) -> float:
    fwd = 4.0 * B * H * N * N * D
    return fwd if mode == "fwd" else 3.5 * fwd


def _qkv(shape: tuple[int, ...], dtype: torch.dtype, device: str, grad: bool):
    """timm's layout: q, k, v are strided views into one (B, N, 3, H, D) projection output."""
    B, H, N, D = shape
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, device=device).to(dtype).requires_grad_(grad)
    return qkv, qkv.permute(2, 0, 3, 1, 4).unbind(0)


def bench_case(
    table: dict[str, Attn], shape: tuple[int, ...], dtype: torch.dtype, mode: str, device: str, args, ref: torch.Tensor
) -> list[dict]:
    """Rows for every provider on one (shape, mode), measured by the harness against the fp32 reference."""
    B, H, N, D = shape
    qkv, (q, k, v) = _qkv(shape, dtype, device, mode == "fwd_bwd")
    scale = D**-0.5
    do = torch.randn(B, H, N, D, device=device, dtype=dtype)
    builders = {name: (lambda attn=attn: ((lambda: attn(q, k, v, scale)), [qkv])) for name, attn in table.items()}
    case = {"B": B, "H": H, "N": N, "D": D, "dtype": str(dtype).replace("torch.", ""), "mode": mode, "device": device}
    return harness.measure_providers(
        builders,
        case,
        mode=mode,
        grad_out=do,
        reference=ref,
        device=device,
        warmup=args.warmup,
        iters=args.iters,
        flops=attention_flops(B, H, N, D, mode),
        cuda_graph=args.cuda_graph,
    )


def _reference_out(shape, dtype, device) -> torch.Tensor:
    _, (q, k, v) = _qkv(shape, dtype, device, False)
    return attention_reference(q.float(), k.float(), v.float(), shape[3] ** -0.5)


def interpreter_row() -> dict:
    """Tiny Triton-interpreter correctness check on CPU: fwd+bwd vs reference (fp32)."""
    B, H, N, D = INTERPRETER_SHAPE
    qkv, (q, k, v) = _qkv(INTERPRETER_SHAPE, torch.float32, "cpu", True)
    do = torch.randn(B, H, N, D)
    return harness.interpreter_row(
        lambda: _triton(q, k, v, D**-0.5),
        lambda: attention_reference(q, k, v, D**-0.5),
        [qkv],
        do,
        {"B": B, "H": H, "N": N, "D": D, "dtype": "float32", "mode": "fwd_bwd", "device": "cpu"},
    )


def format_table(rows: list[dict], baseline: str) -> str:
    base = harness.baseline_of(rows, baseline, KEYS)
    columns = [
        Column("provider", "provider", left=True),
        Column("B", "B"),
        Column("H", "H"),
        Column("N", "N"),
        Column("D", "D"),
        Column("mode", "mode", left=True),
        Column("ms", "ms", "{:.3f}"),
        Column("TFLOP/s", "tflops", "{:.3f}"),
        Column("alloc MB", "alloc_mb", "{:.1f}"),
        Column("peak MB", "peak_mb", "{:.1f}"),
        Column("vs " + baseline, lambda r: harness.ratio(base(r).get("ms"), r.get("ms")), "{:.2f}x"),
        Column("max|err|", "max_abs_err", "{:.2e}"),
        Column(
            "graph ms",
            lambda r: f"{r['graph_ms']:.3f} ({r['graph_timing']})" if "graph_ms" in r else None,
            left=True,
            optional=True,
        ),
    ]
    return harness.format_table(rows, columns, lead=len(KEYS) + 1)


def parse_args(argv: list[str] | None = None):
    p = harness.parser(__doc__, "python -m launchers.bench.attention")
    harness.kernel_flags(p)
    p.add_argument("--shapes", default=None, help="'B,H,N,D;B,H,N,D;...' (default: ViT-B/L set for the device)")
    p.add_argument(
        "--baseline",
        default=None,
        help="provider the ratios are against (default sdpa-flash on CUDA, reference on CPU)",
    )
    return p.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.attention imports triton
    dtype = harness.kernel_settings(args)
    device = args.device
    shapes = (
        harness.int_groups(args.shapes, "--shapes", 4, "64,12,197,64")
        if args.shapes
        else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    )
    table = providers(device, args.providers)
    baseline = args.baseline or ("sdpa-flash" if device == "cuda" else "reference")
    record = harness.start("attention", args, device)
    rows = []
    for shape in shapes:
        ref = _reference_out(shape, dtype, device)
        rows += [row for mode in args.modes for row in bench_case(table, shape, dtype, mode, device, args, ref)]
        del ref
    harness.kernel_report(
        args,
        record,
        rows,
        interpreter_row,
        lambda rows: format_table(rows, baseline),
        "dq,dk,dv",
        dtype,
        baseline,
        flops_convention="fwd 4*B*H*N^2*D; fwd_bwd 3.5x fwd",
    )
    return 0


if __name__ == "__main__":
    main()
