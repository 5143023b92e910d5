"""Triton fused LoRA linear (Hu et al., arXiv 2106.09685), forward + backward.

``fused_lora_linear`` computes ``y = x W^T + b + s * (drop(x) A^T) B^T`` for x: (..., K), W: (N, K)
frozen, A: (S*r, K), B: (S*n, r), the update added into S output segments of width n (``segments`` =
their start offsets; None = one segment covering N; see kernels.reference). Three kernels:

* ``_lora_down_kernel`` -- the rank-r projection ``scale * drop(X[:, c_s:c_s+L]) A_s^T`` (M x r per
  segment). Forward: ``hs = s * drop(x) A^T`` (M, S*r), s folded in so nothing downstream scales.
  Backward: ``g = s * dy[:, seg_s] B_s`` (M, S*r), the gradient of the rank-r activations.
* ``_lora_gemm_kernel`` -- the main GEMM ``X W^T (+ b)`` with the rank-r update ``H_s BT_s^T`` added
  into the same fp32 accumulator before the single store: the only M x N tensor written is the
  result. Forward: ``y = x W^T + b + hs B^T``; backward: ``dx = dy W + (g A) * keep / (1 - p)``
  (W and A passed with swapped strides; nothing is transposed in memory).
* ``_lora_wgrad_kernel`` -- ``dA = g^T drop(x)`` and ``dB_s = dy[:, seg_s]^T hs_s``: reductions over
  the M rows, split over M into fp32 partials summed afterwards (deterministic, no atomics).

Dropout is regenerated, never stored: every kernel that touches ``drop(x)`` draws the keep-mask
from Philox (``tl.rand``) at the element's logical index ``m * K + k`` with one seed per call, so
forward and backward see the same mask (``lora_dropout_mask`` returns it, for tests).
No gradient for a frozen W is ever allocated; a trainable W (or bias) gets ``dy^T x`` (``dy.sum``)
from torch. Each piece is a ``torch.library`` custom op with a fake implementation, and the forward
op carries the autograd formula, so the layer traces under ``torch.compile``. On CPU it runs only
under ``TRITON_INTERPRET=1`` (the tests); ``kernels.dispatch`` decides when it is used at all and
asks :func:`unsupported_reason` first (fp64, CPU tensors go to the torch path); called directly,
the kernel raises ``ValueError`` for such inputs. Tiles are a fixed function of the shape (no
autotuning), so every rank runs the same tiles.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.reference import check_lora_args, lora_linear_reference
from kernels.triton_launch import SUPPORTED_DTYPES, dot_precision, interpreting, launch, runnable_on

# Segment offsets that are multiples of this many elements are declared aligned to the compiler
# (``SEG_ALIGNED``), so tiles at ``SEG[s] + k`` load as vectors; other offsets take the generic path.
SEG_ALIGN = 16


@triton.jit
def _keep_scale(seed, rows, cols, ncols, p):
    """(rows, cols) fp32 factor: 1/(1-p) where element (row, col) of a (., ncols) input is kept, else 0."""
    offs = rows.to(tl.int64)[:, None] * ncols + cols[None, :]
    return tl.where(tl.rand(seed, offs) >= p, 1.0 / (1.0 - p), 0.0)


@triton.jit
def _lora_down_kernel(
    X, A, SEG, SEED, OUT, M, L, R, x_cols, scale, p_drop,
    sxm, sxk, sa_seg, saj, sak, som, soj,
    DROPOUT: tl.constexpr, SEG_ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """OUT[m, s*R + j] = scale * sum_{k<L} drop(X)[m, SEG[s] + k] * A[s*sa_seg + j*saj + k*sak]."""
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    js = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    j_ok = js < R
    col0 = tl.load(SEG + s)
    if SEG_ALIGNED:  # the offset is loaded, so the compiler cannot see its alignment by itself
        col0 = tl.multiple_of(col0, 16)
    x_base = X + rows.to(tl.int64)[:, None] * sxm
    a_base = A + s * sa_seg + js[None, :] * saj
    if DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, L, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < L
        x = tl.load(x_base + (col0 + ks)[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            x = (x * _keep_scale(seed, rows, col0 + ks, x_cols, p_drop)).to(X.dtype.element_ty)
        at = tl.load(a_base + ks[:, None] * sak, mask=k_ok[:, None] & j_ok[None, :], other=0.0)  # (K, R)
        acc = tl.dot(x, at, acc, input_precision=PRECISION)
    tl.store(OUT + rows.to(tl.int64)[:, None] * som + (s * R + js)[None, :] * soj,
             (acc * scale).to(OUT.dtype.element_ty), mask=row_ok[:, None] & j_ok[None, :])


@triton.jit
def _lowrank_update(acc, H, BT, SEG, rows, row_ok, cols, n0, N, R, NW, S, shm, shr, sbn, sbr,
                    SEG_ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                    PRECISION: tl.constexpr):
    """acc += H[:, s*R:(s+1)*R] BT[s*NW:(s+1)*NW]^T on the columns of segment s, for the segments the tile meets."""
    for s in range(S):
        off = tl.load(SEG + s)
        if SEG_ALIGNED:
            off = tl.multiple_of(off, 16)
        if (off < n0 + BLOCK_N) & (off + NW > n0):
            seg_ok = (cols >= off) & (cols < off + NW) & (cols < N)
            brow = s * NW + cols - off
            for j0 in range(0, R, BLOCK_R):
                js = j0 + tl.arange(0, BLOCK_R)
                j_ok = js < R
                h = tl.load(H + rows.to(tl.int64)[:, None] * shm + (s * R + js)[None, :] * shr,
                            mask=row_ok[:, None] & j_ok[None, :], other=0.0)
                bt = tl.load(BT + brow[None, :] * sbn + js[:, None] * sbr,
                             mask=j_ok[:, None] & seg_ok[None, :], other=0.0)       # (R, N)
                acc = tl.dot(h, bt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _lora_gemm_kernel(
    X, W, H, BT, BIAS, SEG, SEED, OUT, M, N, K, R, NW, S, p_drop,
    sxm, sxk, swn, swk, shm, shr, sbn, sbr, som, son,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, SEG_ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """OUT (M, N) = X W^T (+ BIAS) + [H_s BT_s^T on columns SEG[s]..SEG[s]+NW] (* keep mask if DROPOUT).

    X: (M, K), W: (N, K), H: (M, S*R), BT: (S*NW, R), all addressed through strides."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M row blocks walk the same W column blocks while they sit in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_base = X + rows.to(tl.int64)[:, None] * sxm
    w_base = W + cols.to(tl.int64)[None, :] * swn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_base + ks[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_base + ks[:, None] * swk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # (K, N)
        acc = tl.dot(x, wt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    n0 = pid_n * BLOCK_N
    if DROPOUT:
        # backward only: d(drop(x)) -> dx passes through the same mask, so the update needs its own tile
        low = _lowrank_update(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), H, BT, SEG, rows, row_ok, cols, n0,
                              N, R, NW, S, shm, shr, sbn, sbr, SEG_ALIGNED, BLOCK_N, BLOCK_R, PRECISION)
        acc += low * _keep_scale(tl.load(SEED), rows, cols, N, p_drop)
    else:
        acc = _lowrank_update(acc, H, BT, SEG, rows, row_ok, cols, n0, N, R, NW, S, shm, shr, sbn, sbr,
                              SEG_ALIGNED, BLOCK_N, BLOCK_R, PRECISION)
    tl.store(OUT + rows.to(tl.int64)[:, None] * som + cols[None, :] * son, acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _lora_wgrad_kernel(
    LM, RM, SEG, SEED, PART, M, A_LEN, B_LEN, rows_per_split, r_step, drop_cols, p_drop,
    slm, sla, srm, srb, sps, spa, spb,
    NSPLIT, DROPOUT: tl.constexpr, SEG_ALIGNED: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):
    """PART[split, s*A_LEN + a, b] = sum over this split's rows m of LM[m, SEG[s] + a] * drop(RM)[m, s*r_step + b]."""
    a_idx = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    b_idx = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    s = tl.program_id(2) // NSPLIT
    split = tl.program_id(2) % NSPLIT
    a_ok = a_idx < A_LEN
    b_ok = b_idx < B_LEN
    col0 = tl.load(SEG + s)
    if SEG_ALIGNED:
        col0 = tl.multiple_of(col0, 16)
    lcol = col0 + a_idx
    rcol = s * r_step + b_idx
    m_start = split * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    if DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < m_end
        lt = tl.load(LM + lcol[:, None] * sla + ms.to(tl.int64)[None, :] * slm,
                     mask=a_ok[:, None] & m_ok[None, :], other=0.0)                  # (A, M)
        rt = tl.load(RM + ms.to(tl.int64)[:, None] * srm + rcol[None, :] * srb,
                     mask=m_ok[:, None] & b_ok[None, :], other=0.0)                  # (M, B)
        if DROPOUT:
            rt = (rt * _keep_scale(seed, ms, rcol, drop_cols, p_drop)).to(RM.dtype.element_ty)
        acc = tl.dot(lt, rt, acc, input_precision=PRECISION)
    tl.store(PART + split * sps + (s * A_LEN + a_idx)[:, None] * spa + b_idx[None, :] * spb, acc,
             mask=a_ok[:, None] & b_ok[None, :])


@triton.jit
def _dropout_mask_kernel(SEED, OUT, M, K, p_drop, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_scale(tl.load(SEED), rows, cols, K, p_drop) > 0.0
    tl.store(OUT + rows.to(tl.int64)[:, None] * K + cols[None, :], keep.to(tl.int8),
             mask=(rows < M)[:, None] & (cols < K)[None, :])


# ------------------------------------------------------------------------------------------------
# Tile choice: a pure function of the shape, dtype and GPU model, never timed at run time, so every
# rank of a run (and every rerun) launches the same tiles, hence the same summation order. (Autotuning
# picks per process, so ranks could differ.) UNTUNED for speed: no GPU was available; the tiles
# are the usual Triton matmul starting points, checked statically with `python -m launchers.bench.ptxas`
# (sm_80/sm_90 compile: shared memory, registers, spills; figures in the README).
# ------------------------------------------------------------------------------------------------
def gemm_tiles(M: int, N: int, dtype: torch.dtype, sm_count: int, dropout: bool) -> dict:
    """Main GEMM tiles for an (M, N) output: 128x128 while that fills the GPU, else narrower.

    The dropout epilogue (backward dx) keeps a second accumulator and the Philox state live: at
    128x128 it needs 255 registers on sm_90, at 64x128 with 8 warps 78-128."""
    if interpreting():  # every program runs in Python: one small tile shape
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # twice the shared memory per stage; 4 warps spill 0.7-1.4 KB on sm_80
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    if dropout:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    if triton.cdiv(M, 128) * triton.cdiv(N, 128) >= sm_count:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


def rank_block(n: int, cap: int = 128) -> int:
    """The rank side of a tile: a power of two >= 16 (tl.dot's minimum), at most ``cap``."""
    return min(cap, max(16, triton.next_power_of_2(n)))


def down_tiles(R: int, dtype: torch.dtype) -> dict:
    """Rank-r projection tiles (memory-bound: x or dy is read once). A 128-wide rank tile (q and v
    at r=64) takes 8 warps: 64 registers, where 4 warps need 113 (167 with dropout) on sm_90."""
    br = rank_block(R, 64 if dtype == torch.float32 else 128)
    bm = 32 if dtype == torch.float32 and not interpreting() else 64
    return dict(BLOCK_M=bm, BLOCK_R=br, BLOCK_K=64, num_warps=8 if br >= 128 else 4,
                num_stages=2 if dtype == torch.float32 else 3)


def wgrad_tiles(A_LEN: int, B_LEN: int, dtype: torch.dtype, dropout: bool) -> dict:
    """Weight-gradient tiles. With dropout every element of the streamed tile draws a Philox number:
    a 64-wide tile and 32-row steps keep that under 100 registers (128-wide: 170-232 on sm_90)."""
    ba, bb = rank_block(A_LEN), rank_block(B_LEN)
    if dtype == torch.float32:
        ba, bb = min(ba, 64), min(bb, 64)
    if dropout or dtype == torch.float32:
        return dict(BLOCK_A=ba, BLOCK_B=min(bb, 64), BLOCK_M=32, num_warps=8, num_stages=2)
    return dict(BLOCK_A=ba, BLOCK_B=bb, BLOCK_M=64, num_warps=8, num_stages=2)


def _sm_count(device: torch.device) -> int:
    # meta tensors (launchers.bench.ptxas compiling without a GPU) stand for an H100/H200 (132 SMs)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
_seg_cache: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}


def _segments_on(segments: Sequence[int], device: torch.device) -> torch.Tensor:
    key = (tuple(segments), str(device))
    if key not in _seg_cache:  # one tiny host->device copy per (segments, device), not per call
        _seg_cache[key] = torch.tensor(list(segments), dtype=torch.int32, device=device)
    return _seg_cache[key]


def _aligned(segs: Sequence[int]) -> bool:
    return all(s % SEG_ALIGN == 0 for s in segs)


def _down(x, a, a_strides, segs, L, R, scale, p, seed, x_cols):
    """(M, S*R) = scale * drop(x[:, seg_s:seg_s+L]) A_s^T per segment; a_strides = (segment, j, k)."""
    M = x.shape[0]
    out = x.new_empty((M, len(segs) * R))
    t = down_tiles(R, x.dtype)
    grid = (triton.cdiv(M, t["BLOCK_M"]), len(segs), triton.cdiv(R, t["BLOCK_R"]))
    launch("lora_down", _lora_down_kernel, grid, x,
           x, a, _segments_on(segs, x.device), seed if seed is not None else x, out, M, L, R, x_cols, scale, p,
           *x.stride(), *a_strides, *out.stride(),
           DROPOUT=p > 0, SEG_ALIGNED=_aligned(segs), PRECISION=dot_precision(x.dtype), **t)
    return out


def _gemm(x, w, w_strides, h, bt, bt_strides, bias, segs, NW, R, N, p, seed):
    """(M, N) = x W^T + bias + low-rank update (see _lora_gemm_kernel); w_strides = (n, k), bt_strides = (n, r)."""
    M, K = x.shape
    out = x.new_empty((M, N))
    t = gemm_tiles(M, N, x.dtype, _sm_count(x.device), p > 0)
    grid = (triton.cdiv(M, t["BLOCK_M"]) * triton.cdiv(N, t["BLOCK_N"]),)
    launch("lora_gemm", _lora_gemm_kernel, grid, x,
           x, w, h, bt, bias if bias is not None else x, _segments_on(segs, x.device),
           seed if seed is not None else x, out, M, N, K, R, NW, len(segs), p,
           *x.stride(), *w_strides, *h.stride(), *bt_strides, *out.stride(),
           HAS_BIAS=bias is not None, DROPOUT=p > 0, SEG_ALIGNED=_aligned(segs),
           BLOCK_R=rank_block(R, 16 if x.dtype == torch.float32 else 64),  # the epilogue's rank steps
           PRECISION=dot_precision(x.dtype), **t)
    return out


def _wgrad(lm, rm, rm_strides, segs, A_LEN, B_LEN, r_step, p, seed, drop_cols, dtype):
    """(S*A_LEN, B_LEN) = per segment lm[:, seg_s:+A_LEN]^T drop(rm)[:, s*r_step:+B_LEN], reduced over M."""
    M = lm.shape[0]
    S = len(segs)
    t = wgrad_tiles(A_LEN, B_LEN, lm.dtype, p > 0)
    bm = t["BLOCK_M"]
    tiles = triton.cdiv(A_LEN, t["BLOCK_A"]) * triton.cdiv(B_LEN, t["BLOCK_B"]) * S
    if interpreting():
        split = min(2, triton.cdiv(M, bm))  # still exercises the partial-sum path
    else:  # about two waves of programs, each split reducing at least 4 row blocks
        split = max(1, min(triton.cdiv(2 * _sm_count(lm.device), tiles), triton.cdiv(M, 4 * bm)))
    rows_per_split = triton.cdiv(triton.cdiv(M, split), bm) * bm
    split = triton.cdiv(M, rows_per_split)
    part = torch.empty((split, S * A_LEN, B_LEN), device=lm.device, dtype=torch.float32)
    grid = (triton.cdiv(A_LEN, t["BLOCK_A"]), triton.cdiv(B_LEN, t["BLOCK_B"]), S * split)
    launch("lora_wgrad", _lora_wgrad_kernel, grid, lm,
           lm, rm, _segments_on(segs, lm.device), seed if seed is not None else lm, part,
           M, A_LEN, B_LEN, rows_per_split, r_step, drop_cols, p,
           *lm.stride(), *rm_strides, *part.stride(),
           NSPLIT=split, DROPOUT=p > 0, SEG_ALIGNED=_aligned(segs), PRECISION=dot_precision(lm.dtype), **t)
    return (part[0] if split == 1 else part.sum(0)).to(dtype)


# Custom ops: x is 2-D (M, K); segments: start columns, each ``n`` wide; seed: (1,) int64 or None.
@torch.library.custom_op("geoexplora::lora_linear_fwd", mutates_args=())
def _lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
              lora_b: torch.Tensor, segments: list[int], n: int, scale: float, dropout_p: float,
              seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y (M, N), hs = scale * drop(x) A^T (M, S*r), kept for the backward)."""
    M, K = x.shape
    N = weight.shape[0]
    r = lora_b.shape[1]
    hs = _down(x, lora_a, (0, *lora_a.stride()), [0], K, lora_a.shape[0], scale, dropout_p, seed, K)
    y = _gemm(x, weight, weight.stride(), hs, lora_b, lora_b.stride(), bias, segments, n, r, N, 0.0, None)
    return y, hs


@_lora_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, segments, n, scale, dropout_p, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@torch.library.custom_op("geoexplora::lora_linear_bwd_g", mutates_args=())
def _lora_bwd_g(dy: torch.Tensor, lora_b: torch.Tensor, segments: list[int], n: int, scale: float) -> torch.Tensor:
    """g = scale * dy[:, seg_s:seg_s+n] B_s per segment -> (M, S*r): the gradient of drop(x) A^T."""
    r = lora_b.shape[1]
    # A_s[j, k] = B[s*n + k, j]: B read through swapped strides
    return _down(dy, lora_b, (n * lora_b.stride(0), lora_b.stride(1), lora_b.stride(0)), segments, n, r,
                 scale, 0.0, None, dy.shape[1])


@_lora_bwd_g.register_fake
def _(dy, lora_b, segments, n, scale):
    return dy.new_empty((dy.shape[0], len(segments) * lora_b.shape[1]))


@torch.library.custom_op("geoexplora::lora_linear_bwd_dx", mutates_args=())
def _lora_bwd_dx(dy: torch.Tensor, weight: torch.Tensor, g: torch.Tensor, lora_a: torch.Tensor,
                 dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """dx = dy W + (g A) * keep / (1 - p) -> (M, K), one GEMM with the rank-r term in its epilogue."""
    K = weight.shape[1]
    SR = lora_a.shape[0]
    w_t = (weight.stride(1), weight.stride(0))  # "W"[k, n] = W[n, k]
    a_t = (lora_a.stride(1), lora_a.stride(0))  # "BT"[k, j] = A[j, k]
    return _gemm(dy, weight, w_t, g, lora_a, a_t, None, [0], K, SR, K, dropout_p, seed)


@_lora_bwd_dx.register_fake
def _(dy, weight, g, lora_a, dropout_p, seed):
    return dy.new_empty((dy.shape[0], weight.shape[1]))


@torch.library.custom_op("geoexplora::lora_linear_bwd_da", mutates_args=())
def _lora_bwd_da(g: torch.Tensor, x: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """dA = g^T drop(x) -> (S*r, K)."""
    K = x.shape[1]
    return _wgrad(g, x, x.stride(), [0], g.shape[1], K, 0, dropout_p, seed, K, x.dtype)


@_lora_bwd_da.register_fake
def _(g, x, dropout_p, seed):
    return x.new_empty((g.shape[1], x.shape[1]))


@torch.library.custom_op("geoexplora::lora_linear_bwd_db", mutates_args=())
def _lora_bwd_db(dy: torch.Tensor, hs: torch.Tensor, segments: list[int], n: int) -> torch.Tensor:
    """dB_s = dy[:, seg_s:seg_s+n]^T hs_s -> (S*n, r) (hs already carries the scale)."""
    r = hs.shape[1] // len(segments)
    return _wgrad(dy, hs, hs.stride(), segments, n, r, r, 0.0, None, 0, dy.dtype)


@_lora_bwd_db.register_fake
def _(dy, hs, segments, n):
    return dy.new_empty((len(segments) * n, hs.shape[1] // len(segments)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, segments, n, scale, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], seed)
    ctx.segments, ctx.n, ctx.scale, ctx.dropout_p = segments, n, scale, dropout_p


def _backward(ctx, dy, _dhs):
    # hs is internal (fused_lora_linear returns only y), so its incoming gradient is unused.
    x, weight, lora_a, lora_b, hs, seed = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    dx = dw = dbias = da = db = None
    if need_x or need_a:
        g = _lora_bwd_g(dy, lora_b, ctx.segments, ctx.n, ctx.scale)
        if need_x:
            dx = _lora_bwd_dx(dy, weight, g, lora_a, ctx.dropout_p, seed)
        if need_a:
            da = _lora_bwd_da(g, x, ctx.dropout_p, seed)
    if need_b:
        db = _lora_bwd_db(dy, hs, ctx.segments, ctx.n)
    if need_w:  # unfrozen base weight: plain GEMM, the fused kernel adds nothing here
        dw = dy.t().mm(x)
    if need_bias:
        dbias = dy.sum(0)
    return dx, dw, dbias, da, db, None, None, None, None, None


_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the kernel runs in: the autocast dtype under autocast, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def unsupported_reason(x: torch.Tensor) -> str | None:
    """Why the kernel cannot take x (None when it can): ``kernels.dispatch`` then uses the torch path."""
    if not runnable_on(x.device):
        return f"tensors on {x.device}: the Triton kernel needs CUDA (or TRITON_INTERPRET=1)"
    if compute_dtype(x) not in SUPPORTED_DTYPES:
        return f"dtype {compute_dtype(x)} (the kernel runs float16, bfloat16, float32)"
    return None


def _seed_tensor(seed: int | None, device: torch.device) -> torch.Tensor:
    if seed is None:  # drawn from torch's generator, so torch.manual_seed / checkpoint RNG replay apply
        return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)
    return torch.full((1,), int(seed), device=device, dtype=torch.int64)


def fused_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
    segments: Sequence[int] | None = None,
    *,
    seed: int | None = None,
) -> torch.Tensor:
    """``y = x W^T + b + scale * (drop(x) A^T) B^T``; x: (..., K) -> (..., N). Same contract as
    ``kernels.reference.lora_linear_reference`` (W (N, K), A (S*r, K), B (S*n, r), ``segments``).

    Differentiable in x, A, B, and in W / bias when they require grad. Dropout (``training`` and
    ``dropout_p > 0``) uses ``seed`` when given (``lora_dropout_mask(seed, x.shape, p)`` is then the
    mask applied), else a seed drawn from torch's generator on x's device. Inputs of different
    floating dtypes are cast to x's dtype (the autocast dtype under autocast); math is fp32-accumulated.
    """
    n = check_lora_args(x, weight, bias, lora_a, lora_b, dropout_p, segments)
    reason = unsupported_reason(x)
    if reason is not None:
        raise ValueError(f"fused_lora_linear: {reason}")
    dtype = compute_dtype(x)
    x, weight, lora_a, lora_b = (t if t.dtype == dtype else t.to(dtype) for t in (x, weight, lora_a, lora_b))
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    p = float(dropout_p) if training else 0.0
    if x.numel() == 0:  # no rows: nothing to launch
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, p, training, segments)
    seed_t = _seed_tensor(seed, x.device) if p > 0.0 else None
    segs = [0] if segments is None else [int(s) for s in segments]
    y, _ = _lora_fwd(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, segs, n, float(scale), p, seed_t)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lora_dropout_mask(seed: int, shape: Sequence[int], p: float, device: torch.device | str = "cuda") -> torch.Tensor:
    """The keep-mask (bool, ``shape`` = x's shape) that ``fused_lora_linear(..., seed=seed)`` applies
    with dropout probability ``p``; for exact comparisons with the reference's ``dropout_mask``."""
    shape = tuple(shape)
    K = shape[-1]
    M = 1
    for d in shape[:-1]:
        M *= d
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    if out.numel():
        launch("lora_dropout_mask", _dropout_mask_kernel, (triton.cdiv(M, 32), triton.cdiv(K, 32)), out,
               _seed_tensor(seed, out.device), out, M, K, float(p), BLOCK_M=32, BLOCK_K=32)
    return out.bool().reshape(shape)
