"""Fast pure-torch LoRA linear: the default backend until a Triton kernel is measured faster.

``lora_linear_torch`` computes ``y = x W^T + b + s * (drop(x) A_s^T) B_s^T`` into output segment s
(contract and shapes of ``kernels.reference.lora_linear_reference``) with BLAS calls only, no
slicing-and-concatenating:

* forward: ``y = addmm(b, x, W^T)``, ``h = drop(x) A^T`` (M, S*r), then one in-place
  ``y[:, off_s:off_s+n].addmm_(h_s, B_s^T, alpha=s)`` per segment: the GEMM writes straight into
  the strided view of y (ldc = N), so the only M x N tensor is y itself;
* backward (an ``autograd.Function``, so no zero-filled slice gradients and no full-size adds):
  ``g_s = s * dy_s B_s`` written into the columns of one (M, S*r) tensor (``addmm_`` with beta = 0
  on uninitialised memory), ``dx = dy W + (g A) * keep``, ``dA = g^T drop(x)``,
  ``dB_s = s * dy_s^T h_s`` (again written in place), and ``dW = dy^T x`` / ``db = sum(dy)`` only
  when the base layer trains.

This is the approach Unsloth's ``matmul_lora`` takes (in-place ``addmm_`` of the low-rank term into
the base output); here it also covers adapters on output slices of one fused projection (q and v of
timm's qkv). Dropout draws its keep-mask exactly as ``F.dropout`` does on the same device (the
fused CUDA kernel, or ``bernoulli_`` on CPU), from torch's generator, so the reference and this
path apply the same mask after the same ``torch.manual_seed``, and activation checkpointing
replays it. The mask is kept as bool (1 byte per element) and ``drop(x)`` is recomputed in the
backward instead of being stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.reference import check_lora_args


def _dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop(x), bool keep-mask), drawing the same random numbers as ``F.dropout(x, p, True)``."""
    if x.is_cuda:  # F.dropout takes the fused native_dropout kernel on CUDA
        return torch.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1.0 - p)  # F.dropout's CPU path: same call, same stream
    keep = noise.bool()
    return x * noise.div_(1.0 - p), keep


def _apply_keep(t: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """``t * keep / (1 - p)``, rounded as the forward's dropout rounds (used for drop(x) and its gradient)."""
    if t.is_cuda:
        return torch.ops.aten.native_dropout_backward(t, keep, 1.0 / (1.0 - p))
    return t * keep.to(t.dtype).div_(1.0 - p)


class _LoRALinear(torch.autograd.Function):
    """x2: (M, K) -> (M, N); every other argument as in ``lora_linear_torch``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, p, segments, n, x_shape):
        x2 = x.reshape(-1, x.shape[-1])
        r = lora_b.shape[1]
        y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        keep = None
        if p > 0.0:
            xd, keep = _dropout(x, p)
            h = torch.mm(xd.reshape(-1, x.shape[-1]), lora_a.t())
            del xd
        else:
            h = torch.mm(x2, lora_a.t())  # (M, S*r)
        for s, off in enumerate(segments):
            y[:, off : off + n].addmm_(h[:, s * r : (s + 1) * r], lora_b[s * n : (s + 1) * n].t(), alpha=scale)
        # x itself (not a reshaped copy) is saved: it is alive anyway as the layer's input
        ctx.save_for_backward(x, weight, lora_a, lora_b, h, keep)
        ctx.scale, ctx.p, ctx.segments, ctx.n = scale, p, segments, n
        return y.view(*x_shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, h, keep = ctx.saved_tensors
        scale, p, segments, n = ctx.scale, ctx.p, ctx.segments, ctx.n
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        K = x.shape[-1]
        dy2 = dy.reshape(-1, weight.shape[0])
        r = lora_b.shape[1]
        dx = dw = dbias = da = db = None
        if need_x or need_a:
            g = dy2.new_empty((dy2.shape[0], len(segments) * r))  # s * dy_s B_s, per segment's columns
            for s, off in enumerate(segments):
                g[:, s * r : (s + 1) * r].addmm_(
                    dy2[:, off : off + n], lora_b[s * n : (s + 1) * n], beta=0, alpha=scale
                )
            if need_x:
                dx = torch.mm(dy2, weight)
                if keep is None:
                    dx.addmm_(g, lora_a)
                else:
                    dx += _apply_keep(torch.mm(g, lora_a).view(x.shape), keep, p).reshape(-1, K)
                dx = dx.view(x.shape)
            if need_a:
                xd = x if keep is None else _apply_keep(x, keep, p)
                da = torch.mm(g.t(), xd.reshape(-1, K))
        if need_b:
            db = lora_b.new_empty(lora_b.shape)
            for s, off in enumerate(segments):
                db[s * n : (s + 1) * n].addmm_(
                    dy2[:, off : off + n].t(), h[:, s * r : (s + 1) * r], beta=0, alpha=scale
                )
        if need_w:  # base layer not frozen
            dw = torch.mm(dy2.t(), x.reshape(-1, K))
        if need_bias:
            dbias = dy2.sum(0)
        return dx, dw, dbias, da, db, None, None, None, None, None


def lora_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
    segments: Sequence[int] | None = None,
) -> torch.Tensor:
    """``y = x W^T + b + scale * (drop(x) A^T) B^T``; x: (..., K) -> (..., N). Same contract as
    ``kernels.reference.lora_linear_reference`` (W (N, K), A (S*r, K), B (S*n, r), ``segments``).

    Differentiable in x, A, B, and in W / bias when they require grad. Under autocast every input is
    cast to the autocast dtype first (as autocast would cast each GEMM's inputs), so the backward
    runs in one dtype.
    """
    n = check_lora_args(x, weight, bias, lora_a, lora_b, dropout_p, segments)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        x, weight, lora_a, lora_b = (t.to(dtype) for t in (x, weight, lora_a, lora_b))
        bias = None if bias is None else bias.to(dtype)
    p = float(dropout_p) if training else 0.0
    segs = (0,) if segments is None else tuple(int(s) for s in segments)
    with torch.autocast(dev, enabled=False):
        return _LoRALinear.apply(x, weight, bias, lora_a, lora_b, float(scale), p, segs, n, tuple(x.shape))
