"""Static compile report of every Triton launch: registers, spills and shared memory; no GPU needed.

    python -m launchers.bench.ptxas                                   # sm_90, bf16, ViT-B/L shapes
    python -m launchers.bench.ptxas --archs 80,90 --dtypes bf16,fp16,fp32 --out ptxas.json

How: the launchers' own code runs on CPU tensors whose memory is never read by a kernel, inside
``kernels.triton_launch.recording_launches()``, which collects each launch (kernel, arguments,
meta-parameters) instead of running it. Each launch is then specialised exactly as Triton's JIT
specialises it at run time for those arguments (16-byte-aligned pointers, integers divisible by 16,
arguments equal to 1 as constants), compiled for the target GPU with ``triton.compile``, and its PTX
is assembled by Triton's bundled ``ptxas -v``, whose report gives registers per thread and spill
bytes. Zero spills is necessary for speed, not proof of it.

Cases: LoRA linear forward + backward (with and without dropout) at ViT-B/L layers (qkv with q,v
adapters at r=64, fc1/fc2 at r=64, proj at r=8, M = 64 x 257 tokens) and flash attention forward +
backward at ViT-B/L global and local crops (D = 64) plus D = 80 and 128.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile

import torch

from engine.errors import UserError, cli_entry
from engine.progress import setup_logging
from launchers.bench import harness
from launchers.bench.harness import Column

log = logging.getLogger(__name__)
# (name, M, K, N, r, qv): the adapted layers of ViT-B/14 and ViT-L/14 at 64 images x 257 tokens
LORA_CASES = [
    (f"{m}.{layer}", 64 * 257, k, n, r, qv)
    for m, d in (("vitb", 768), ("vitl", 1024))
    for layer, k, n, r, qv in (
        ("qkv(q,v)", d, 3 * d, 64, True),
        ("proj", d, d, 8, False),
        ("fc1", d, 4 * d, 64, False),
        ("fc2", 4 * d, d, 64, False),
    )
]
# (B, H, N, D): ViT-L global crops (224 px / 14 -> 257 tokens), local crops (98 px -> 50), D 80 / 128
ATTENTION_CASES = [(64, 16, 257, 64), (256, 16, 50, 64), (64, 16, 257, 80), (32, 8, 257, 128)]


def record_lora(M: int, K: int, N: int, r: int, qv: bool, dtype: torch.dtype, p: float) -> list:
    """The launches of one LoRA-linear forward + backward (x, A, B trainable, W frozen)."""
    import kernels.lora_linear  # noqa: F401 - registers the geoexplora::lora_linear_* ops
    from kernels.triton_launch import recording_launches

    S, n = (2, N // 3) if qv else (1, N)
    segs = [0, 2 * N // 3] if qv else [0]
    x = torch.empty(M, K, dtype=dtype, requires_grad=True)
    w, b = torch.empty(N, K, dtype=dtype), torch.empty(N, dtype=dtype)
    a = torch.empty(S * r, K, dtype=dtype, requires_grad=True)
    bb = torch.empty(S * n, r, dtype=dtype, requires_grad=True)
    seed = torch.zeros(1, dtype=torch.int64) if p > 0 else None
    with recording_launches() as launches:
        y, _ = torch.ops.geoexplora.lora_linear_fwd(x, w, b, a, bb, segs, n, 2.0, p, seed)
        torch.autograd.grad(y, [x, a, bb], torch.empty_like(y))
    return launches


def record_attention(B: int, H: int, N: int, D: int, dtype: torch.dtype) -> list:
    """The launches of one attention forward + backward on timm's strided q, k, v views."""
    import kernels.attention  # noqa: F401 - registers the geoexplora::flash_attn_* ops
    from kernels.triton_launch import recording_launches

    qkv = torch.empty(B, N, 3, H, D, dtype=dtype, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    with recording_launches() as launches:  # the ops, not flash_attention: that refuses CPU tensors
        out, _ = torch.ops.geoexplora.flash_attn_fwd(q, k, v, D**-0.5)
        torch.autograd.grad(out, qkv, torch.empty_like(out))
    return launches


def specialise(kernel, args: tuple, kwargs: dict, arch: int):
    """(ASTSource, target, options) of one recorded launch, specialised as Triton's JIT would for sm_<arch>."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # Triton's own argument binder: the specialisation a launch with these arguments gets.
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), target, options.__dict__


def compile_report(src, target, options: dict) -> dict:
    """Compile and assemble with ``ptxas -v``: shared memory, registers, spill bytes."""
    import triton

    compiled = triton.compile(src, target=target, options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        gpu = f"sm_{target.arch}a" if target.arch >= 90 else f"sm_{target.arch}"
        text = subprocess.run(
            [ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True, text=True, check=True
        ).stderr
    return {
        "smem_bytes": compiled.metadata.shared,
        "registers": _ptxas_count(r"Used (\d+) registers", text),
        "spill_store_bytes": _ptxas_count(r"(\d+) bytes spill stores", text),
        "spill_load_bytes": _ptxas_count(r"(\d+) bytes spill loads", text),
    }


def _ptxas_count(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    if m is None:
        raise RuntimeError(f"ptxas -v printed no {pattern!r}:\n{text}")
    return int(m.group(1))


def report(archs: list[int], dtypes: list[torch.dtype], ops: list[str]) -> list[dict]:
    rows = []
    seen = set()
    for arch in archs:
        for dtype in dtypes:
            cases = []
            if "lora" in ops:
                for name, M, K, N, r, qv in LORA_CASES:
                    for p in (0.0, 0.1):
                        cases.append((f"{name} r={r}{' drop' if p else ''}", record_lora(M, K, N, r, qv, dtype, p)))
            if "attention" in ops:
                for B, H, N, D in ATTENTION_CASES:
                    cases.append((f"attn B{B} H{H} N{N} D{D}", record_attention(B, H, N, D, dtype)))
            for case, launches in cases:
                for kname, kernel, _grid, args, kwargs in launches:
                    src, target, options = specialise(kernel, args, kwargs, arch)
                    key = (
                        kname,
                        arch,
                        repr(src.signature),
                        repr(src.constants),
                        repr(src.attrs),
                        options["num_warps"],
                        options["num_stages"],
                    )
                    if key in seen:  # same kernel, specialisation and meta-parameters: same binary
                        continue
                    seen.add(key)
                    meta = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}
                    row = {
                        "arch": f"sm_{arch}",
                        "dtype": str(dtype).replace("torch.", ""),
                        "case": case,
                        "kernel": kname,
                        "config": meta,
                        **compile_report(src, target, options),
                    }
                    log.info("%s", row)
                    rows.append(row)
    return rows


def _tile(r: dict) -> str:
    c = r["config"]
    dims = "x".join(
        str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_A", "BLOCK_B", "BLOCK_R", "BLOCK_D") if k in c
    )
    flags = "".join(f" {k.lower()}" for k in ("DROPOUT", "SEG_ALIGNED") if c.get(k))
    return f"{dims} w{c.get('num_warps', 4)} s{c.get('num_stages', 3)}{flags}"


COLUMNS = [
    Column("arch", "arch", left=True),
    Column("dtype", "dtype", left=True),
    Column("kernel", "kernel", left=True),
    Column("first case", "case", left=True),
    Column("tile", _tile, left=True),
    Column("smem KB", lambda r: r["smem_bytes"] / 1024, "{:.1f}"),
    Column("regs", "registers"),
    Column("spill B", "spill_store_bytes"),
]


def format_table(rows: list[dict]) -> str:
    spills = sum(r["spill_store_bytes"] > 0 for r in rows)
    return harness.format_table(rows, COLUMNS) + f"\n{len(rows)} distinct compiles, {spills} with register spills"


@cli_entry
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = harness.parser(__doc__, "python -m launchers.bench.ptxas")
    p.add_argument("--archs", default="90", help="comma list of compute capabilities, e.g. 80,90")
    p.add_argument("--dtypes", default="bf16", help=f"comma list of {', '.join(harness.DTYPES)}")
    p.add_argument("--ops", default="lora,attention", help="comma list of lora, attention")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise UserError("TRITON_INTERPRET=1: this report compiles real kernels; unset it")
    archs = harness.comma_list(args.archs, "--archs", cast=int, hint="compute capabilities, e.g. 80,90")
    dtypes = [harness.DTYPES[d] for d in harness.comma_list(args.dtypes, "--dtypes", tuple(harness.DTYPES))]
    ops = harness.comma_list(args.ops, "--ops", ("lora", "attention"))
    record = harness.start("ptxas", args)
    rows = report(archs, dtypes, ops)
    print(format_table(rows))
    harness.save(args.out, record, rows=rows)
    return 0


if __name__ == "__main__":
    main()
