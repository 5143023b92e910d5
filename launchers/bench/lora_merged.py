"""Candidate (b) of issue 14, kept as a benchmark provider: LoRA linear through a merged weight.

Forward: ``W_eff = W`` with ``s * B_s A_s`` added into the rows of each adapted segment, then one
GEMM ``y = x W_eff^T + b``. Backward, factored: ``dx = dy W_eff``; ``g_s = s * dy_s B_s``,
``dA_s = g_s^T x``; ``dB_s = s * dy_s^T (x A_s^T)`` (the rank-r activations recomputed, thin GEMMs).
It costs an (N, K) weight per call and cannot apply dropout to the LoRA branch alone, so it is
measured (``python -m launchers.bench.lora_linear``), not used; ``kernels.lora_torch`` is the backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class _MergedLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, segments, n):
        r = lora_b.shape[1]
        w_eff = weight.clone()
        for s, off in enumerate(segments):
            w_eff[off : off + n].addmm_(lora_b[s * n : (s + 1) * n], lora_a[s * r : (s + 1) * r], alpha=scale)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.mm(x2, w_eff.t()) if bias is None else torch.addmm(bias, x2, w_eff.t())
        ctx.save_for_backward(x, w_eff, lora_a, lora_b)
        ctx.scale, ctx.segments, ctx.n = scale, segments, n
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, w_eff, lora_a, lora_b = ctx.saved_tensors
        scale, segments, n = ctx.scale, ctx.segments, ctx.n
        r = lora_b.shape[1]
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, w_eff.shape[0])
        dx = torch.mm(dy2, w_eff).view(x.shape) if ctx.needs_input_grad[0] else None
        da = lora_a.new_empty(lora_a.shape) if ctx.needs_input_grad[3] else None
        db = lora_b.new_empty(lora_b.shape) if ctx.needs_input_grad[4] else None
        for s, off in enumerate(segments):
            dy_s, b_s, a_s = dy2[:, off : off + n], lora_b[s * n : (s + 1) * n], lora_a[s * r : (s + 1) * r]
            if da is not None:
                torch.mm(torch.mm(dy_s, b_s).t(), x2, out=da[s * r : (s + 1) * r]).mul_(scale)
            if db is not None:
                torch.mm(dy_s.t(), torch.mm(x2, a_s.t()), out=db[s * n : (s + 1) * n]).mul_(scale)
        return dx, None, None, da, db, None, None, None


def lora_linear_merged(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    segments: Sequence[int] | None = None,
) -> torch.Tensor:
    """``y = x (W + s * B A)^T + b`` without dropout; W and b frozen (no gradient)."""
    n = lora_b.shape[0] // (1 if segments is None else len(segments))
    segs = (0,) if segments is None else tuple(int(s) for s in segments)
    return _MergedLoRALinear.apply(x, weight, bias, lora_a, lora_b, float(scale), segs, n)
