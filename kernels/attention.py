"""Triton flash attention (non-causal, ViT self-attention), forward + backward.

``flash_attention(q, k, v, scale)`` computes ``softmax(q k^T * scale) v`` for q: (B, H, Nq, D),
k, v: (B, H, Nk, D) without materializing the (Nq, Nk) score matrix (memory O(N * D) per head):

* forward: one program per (query block, batch*head), flattened into grid dimension 0 (CUDA caps the
  other two at 65535, fewer than 4096 local crops x 16 heads); keys/values stream through in blocks with an
  online softmax (running max ``m`` and sum ``l``, base-2 exponentials with ``log2(e)`` folded into
  the scale); it stores O and the per-row log-sum-exp ``lse = m + log2(l)`` (fp32, base 2).
* backward (recompute, no saved probabilities): ``delta = rowsum(dO * O)`` in a small preprocess
  kernel, then one kernel per key block accumulating dK, dV over all query blocks and one kernel
  per query block accumulating dQ over all key blocks -- two passes instead of atomics, so the
  gradients are deterministic.

Inputs may be any strided views (timm's q, k, v are views into the fused qkv projection); strides
go to the kernels, nothing is copied. Outputs O, dQ, dK, dV are laid out (B, N, H, D) in memory and
returned as (B, H, N, D) views, so the ``transpose(1, 2).reshape(B, N, H*D)`` that follows in the
ViT is free. Head dims up to 128 run by padding the D block to the next power of two (>= 16) with
masked loads, so 64, 80, 88, 96 and 128 all work. fp16/bf16 accumulate in fp32; fp32 inputs use
IEEE fp32 dot products unless ``torch.backends.cuda.matmul.allow_tf32`` is set.

No attention mask / key-padding mask (ViT and MAE's encoder attend over equal-length sequences);
callers with a mask or attention dropout use SDPA (see engine.model.attention).

Registered as ``torch.library`` custom ops (``geoexplora::flash_attn_fwd`` / ``flash_attn_bwd``)
with fake implementations and autograd, so it traces under ``torch.compile``. On CPU it runs only
under ``TRITON_INTERPRET=1`` (the tests); ``kernels.dispatch`` decides when it is used at all and
asks :func:`unsupported_reason` first, so inputs the kernel cannot take (D > 128, fp64, CPU) go to
SDPA; called directly, the kernel raises ``ValueError`` for them.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.triton_launch import SUPPORTED_DTYPES, dot_precision, launch, runnable_on

MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    H, NQ, NK, D, qk_scale, NUM_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # One flat grid dimension (CUDA caps dimensions 1-2 at 65535; 4096 crops x 16 heads is more);
    # the query blocks of one head are neighbours, so its K and V stay in L2 while they stream.
    pid_m = tl.program_id(0) % NUM_BLOCKS
    bh = tl.program_id(0) // NUM_BLOCKS
    # int64 offsets: b * stride passes 2^31 for large batches (B=1024, N=1025, qkv width 3*1024)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < NQ
    dim_ok = dims < D
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < NK
        # K loaded transposed, (BLOCK_D, BLOCK_N), so the dot needs no in-register transpose.
        kt = tl.load(k_base + cols[None, :] * skn + dims[:, None] * skd,
                     mask=dim_ok[:, None] & col_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        # Every block holds >= 1 valid key (start < NK), so m_new is finite and no row gets NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn + dims[None, :] * svd,
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * son + dims[None, :] * sod,
             acc.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(LSE + bh * NQ + rows, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, H, NQ, D, NUM_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0) % NUM_BLOCKS
    bh = tl.program_id(0) // NUM_BLOCKS
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < NQ)[:, None] & (dims < D)[None, :]
    o = tl.load(O + b * sob + h * soh + rows[:, None] * son + dims[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + dims[None, :] * sdd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * NQ + rows, delta, mask=rows < NQ)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    sgb, sgh, sgn, sgd,
    H, NQ, NK, D, sm_scale, qk_scale, NUM_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key block: dV = sum_i P_i^T dO_i, dK = scale * sum_i dS_i^T Q_i over all query blocks i.

    DK and DV share the strides (sgb, sgh, sgn, sgd) (both allocated by the launcher)."""
    pid_n = tl.program_id(0) % NUM_BLOCKS
    bh = tl.program_id(0) // NUM_BLOCKS
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < NK
    dim_ok = dims < D
    kv_mask = col_ok[:, None] & dim_ok[None, :]
    k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + dims[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + dims[None, :] * svd, mask=kv_mask, other=0.0)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start in range(0, NQ, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < NQ
        qt = tl.load(q_base + rows[None, :] * sqn + dims[:, None] * sqd,
                     mask=dim_ok[:, None] & row_ok[None, :], other=0.0)          # (D, M)
        do = tl.load(do_base + rows[:, None] * sdn + dims[None, :] * sdd,
                     mask=row_ok[:, None] & dim_ok[None, :], other=0.0)          # (M, D)
        lse = tl.load(LSE + bh * NQ + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * NQ + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale                 # (N, M)
        # Padded rows/columns get P = 0 before the exponential: padded keys have s = 0, and
        # exp2(0 - lse) overflows when a row's logits are all very negative.
        st = tl.where(col_ok[:, None] & row_ok[None, :], st, float("-inf"))
        pt = tl.math.exp2(st - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)                 # (N, M)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
    dk = dk * sm_scale
    out = b * sgb + h * sgh + cols[:, None] * sgn + dims[None, :] * sgd
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    sgb, sgh, sgn, sgd,
    H, NQ, NK, D, sm_scale, qk_scale, NUM_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One query block: dQ = scale * sum_j dS_j K_j over all key blocks j."""
    pid_m = tl.program_id(0) % NUM_BLOCKS
    bh = tl.program_id(0) // NUM_BLOCKS
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < NQ
    dim_ok = dims < D
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + dims[None, :] * sdd, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * NQ + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * NQ + rows, mask=row_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < NK
        t_mask = dim_ok[:, None] & col_ok[None, :]
        kt = tl.load(k_base + cols[None, :] * skn + dims[:, None] * skd, mask=t_mask, other=0.0)  # (D, N)
        vt = tl.load(v_base + cols[None, :] * svn + dims[:, None] * svd, mask=t_mask, other=0.0)  # (D, N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        # Padded keys have s = 0, and exp2(0 - lse) overflows when a row's logits are all very
        # negative (inf * 0 = NaN in dQ): mask s, not P.
        s = tl.where(col_ok[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * sgb + h * sgh + rows[:, None] * sgn + dims[None, :] * sgd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# Tile shapes (BLOCK_M, BLOCK_N, num_warps, num_stages): fixed per (head dim, dtype), never timed at run
# time, so every rank launches the same tiles. Speed NOT yet measured on a GPU. What was measured
# (`python -m launchers.bench.ptxas`: triton.compile for sm_80 and sm_90 + ptxas -v,
# no GPU needed): every choice below compiles with 0 bytes of register spill on both architectures, while
# the FA-2 tutorial defaults spill there (e.g. fwd 128x64 with 4 warps: 16 B on sm_80; bwd 64x64
# with 4 warps: 64 B dK/dV, 16 B dQ on sm_80; fp32 fwd 64x32 with 4 warps: 9 KB on sm_90).
# Retune with `python -m launchers.bench.attention` on the target GPU and record the table in the README.
def _fwd_config(block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    if dtype == torch.float32:  # 64x32 spills 4-52 B on sm_80 (D 64-128); 32x32 does not
        return 32, 32, 8, 2
    if block_d <= 64:
        return 128, 64, 8, 3
    return 128, 32, 8, 2


def _bwd_configs(block_d: int, dtype: torch.dtype) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(dK/dV kernel config, dQ kernel config). Each kernel keeps its own tile resident (K, V, dK, dV
    of BLOCK_N rows; Q, dO, dQ of BLOCK_M rows) and streams the other in narrow blocks, as FA-2 does."""
    if dtype == torch.float32:  # fp32 32x64 dK/dV spills 4 B-3.2 KB, 64x32 dQ 60 B (sm_80); 32x32 none
        return (32, 32, 8, 2), (32, 32, 8, 2)
    if block_d <= 64:
        return (32, 128, 8, 2), (128, 32, 8, 2)
    return (64, 32, 8, 2), (32, 64, 8, 2)


# Blocks of the delta = rowsum(dO * O) pass: elementwise, so any tile works; 4 warps.
_PRE_WARPS = 4


def launch_configs(head_dim: int, dtype: torch.dtype) -> dict[str, tuple[dict, int, int]]:
    """kernel name -> (constexpr arguments, num_warps, num_stages) exactly as the launchers use them."""
    block_d = _head_block(head_dim)
    prec = dot_precision(dtype)
    bm, bn, w, st = _fwd_config(block_d, dtype)
    (bm1, bn1, w1, st1), (bm2, bn2, w2, st2) = _bwd_configs(block_d, dtype)
    tile = dict(BLOCK_D=block_d, PRECISION=prec)
    return {
        "fwd": (dict(BLOCK_M=bm, BLOCK_N=bn, **tile), w, st),
        "bwd_preprocess": (dict(BLOCK_M=bm2, BLOCK_D=block_d), _PRE_WARPS, 1),
        "bwd_dkdv": (dict(BLOCK_M=bm1, BLOCK_N=bn1, **tile), w1, st1),
        "bwd_dq": (dict(BLOCK_M=bm2, BLOCK_N=bn2, **tile), w2, st2),
    }


def _head_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _empty_bnhd(ref: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, n, D) tensor stored as (B, n, H, D): the ViT's head merge after attention is then free."""
    B, H, _, D = ref.shape
    return ref.new_empty((B, n, H, D)).transpose(1, 2)


@torch.library.custom_op("geoexplora::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (B, H, Nq, D), k, v: (B, H, Nk, D) -> (O (B, H, Nq, D), lse (B, H, Nq) fp32, base 2)."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    o = _empty_bnhd(q, NQ)
    lse = torch.empty((B, H, NQ), device=q.device, dtype=torch.float32)
    consts, warps, stages = launch_configs(D, q.dtype)["fwd"]
    blocks = triton.cdiv(NQ, consts["BLOCK_M"])
    launch("attn_fwd", _attn_fwd_kernel, (blocks * B * H,), q,
           q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
           H, NQ, NK, D, scale * _LOG2E, blocks, **consts, num_warps=warps, num_stages=stages)
    return o, lse


@_flash_attn_fwd.register_fake
def _(q, k, v, scale):
    B, H, NQ, _ = q.shape
    return _empty_bnhd(q, NQ), q.new_empty((B, H, NQ), dtype=torch.float32)


@torch.library.custom_op("geoexplora::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dO: (B, H, Nq, D) and the forward's tensors -> (dQ, dK, dV), shaped like q, k, v."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    cfg = launch_configs(D, q.dtype)
    delta = torch.empty((B, H, NQ), device=q.device, dtype=torch.float32)
    dq = _empty_bnhd(q, NQ)
    dk = _empty_bnhd(k, NK)
    dv = _empty_bnhd(v, NK)
    c, w, st = cfg["bwd_preprocess"]
    blocks = triton.cdiv(NQ, c["BLOCK_M"])
    launch("attn_bwd_preprocess", _attn_bwd_preprocess_kernel, (blocks * B * H,), q,
           o, do, delta, *_strides(o), *_strides(do), H, NQ, D, blocks, **c, num_warps=w, num_stages=st)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    c, w, st = cfg["bwd_dkdv"]
    blocks = triton.cdiv(NK, c["BLOCK_N"])
    launch("attn_bwd_dkdv", _attn_bwd_dkdv_kernel, (blocks * B * H,), q,
           q, k, v, do, lse, delta, dk, dv, *common, *_strides(dk), H, NQ, NK, D, scale, scale * _LOG2E, blocks,
           **c, num_warps=w, num_stages=st)
    c, w, st = cfg["bwd_dq"]
    blocks = triton.cdiv(NQ, c["BLOCK_M"])
    launch("attn_bwd_dq", _attn_bwd_dq_kernel, (blocks * B * H,), q,
           q, k, v, do, lse, delta, dq, *common, *_strides(dq), H, NQ, NK, D, scale, scale * _LOG2E, blocks,
           **c, num_warps=w, num_stages=st)
    return dq, dk, dv


@_flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, scale):
    return _empty_bnhd(q, q.shape[2]), _empty_bnhd(k, k.shape[2]), _empty_bnhd(v, v.shape[2])


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _backward(ctx, do, dlse):
    # lse is an internal output (flash_attention returns only O), so its gradient is never used.
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


_flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q is (B, H, Nq, D) and k, v are (B, H, Nk, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention: q, k, v must be (B, H, N, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (need q (B, H, Nq, D), k = v (B, H, Nk, D))")


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot take (q, k, v) (None when it can): ``kernels.dispatch`` then uses SDPA."""
    D = q.shape[-1]
    if not 1 <= D <= MAX_HEAD_DIM:
        return f"head dim D={D} (the kernel runs 1 <= D <= {MAX_HEAD_DIM})"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} (the kernel runs float16, bfloat16, float32, all three alike)"
    if not runnable_on(q.device):
        return f"tensors on {q.device}: the Triton kernel needs CUDA (or TRITON_INTERPRET=1)"
    return None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
                    ) -> torch.Tensor:
    """``softmax(q k^T * scale) v``; q: (B, H, Nq, D), k, v: (B, H, Nk, D) -> (B, H, Nq, D).

    ``scale`` defaults to ``1/sqrt(D)``. Differentiable in q, k, v. The result is a (B, H, Nq, D)
    view of (B, Nq, H, D) memory.
    """
    check_shapes(q, k, v)
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(f"flash_attention: {reason}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, _ = _flash_attn_fwd(q, k, v, scale)
    return o
