"""Pure-torch references: the ground truth every kernel is tested against, and the CPU path.

Shapes: x (M, K) or (..., K); W (N, K); A (S*r, K); B (S*n, r) where S = number of output
segments that carry an adapter (1 = the whole output, n = N); q, k, v (B, H, N, D).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def check_lora_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    dropout_p: float,
    segments: Sequence[int] | None,
) -> int:
    """Validate the shapes, segments and devices of the LoRA-linear contract; return the segment width n.

    Every LoRA backend calls this first, so each raises the same ``ValueError`` for the same mistake.
    """
    N, K = weight.shape
    S = 1 if segments is None else len(segments)
    if x.shape[-1] != K or lora_a.dim() != 2 or lora_a.shape[1] != K or lora_b.dim() != 2:
        raise ValueError(
            f"lora_linear: x {tuple(x.shape)}, W {tuple(weight.shape)}, A {tuple(lora_a.shape)}, "
            f"B {tuple(lora_b.shape)} do not fit y = x W^T + (x A^T) B^T"
        )
    if S == 0 or lora_a.shape[0] % S or lora_b.shape[0] % S or lora_b.shape[1] * S != lora_a.shape[0]:
        raise ValueError(
            f"lora_linear: A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not split "
            f"into {S} segment adapters (need A (S*r, K), B (S*n, r))"
        )
    n = lora_b.shape[0] // S
    if segments is None and n != N:
        raise ValueError(f"lora_linear: B has {n} rows but W has {N} outputs (pass segments for a subset)")
    if segments is not None:
        ends = [s + n for s in segments]
        if segments[0] < 0 or ends[-1] > N or any(b < a for a, b in zip(ends, segments[1:])):
            raise ValueError(
                f"lora_linear: segments {tuple(segments)} of width {n} are not increasing, "
                f"non-overlapping slices of {N} outputs"
            )
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"lora_linear: bias {tuple(bias.shape)} should be ({N},)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_linear: dropout_p={dropout_p} must be in [0, 1)")
    if any(t is not None and t.device != x.device for t in (weight, bias, lora_a, lora_b)):
        raise ValueError("lora_linear: x, W, b, A, B must be on one device")
    return n


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
    segments: Sequence[int] | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x W^T + b + scale * (drop(x) A_s^T) B_s^T`` added into output segment s.

    ``segments``: start offsets (along N) of the S adapted output slices, each ``n = B.shape[0] // S``
    wide; None = one segment covering all of N (plain LoRA). With timm's fused qkv (N = 3*dim) and
    LoRA on q and v only: ``segments=(0, 2*dim)``, ``A = [A_q; A_v]`` (2r, K), ``B = [B_q; B_v]`` (2*dim, r).
    ``dropout_mask``: optional explicit keep-mask (same shape as x, values 0/1) so that tests can
    reproduce a kernel's dropout exactly; scaled by 1/(1-p) here.
    """
    y = F.linear(x, weight, bias)
    if dropout_mask is not None:
        xd = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0 and training:
        xd = F.dropout(x, dropout_p, training=True)
    else:
        xd = x
    h = F.linear(xd, lora_a)  # (..., S*r)
    if segments is None:
        return y + scale * F.linear(h, lora_b)
    S = len(segments)
    r = lora_a.shape[0] // S
    n = lora_b.shape[0] // S
    parts = []
    prev = 0
    for s, off in enumerate(segments):
        if off < prev:
            raise ValueError(f"segments must be increasing and non-overlapping, got {tuple(segments)}")
        parts.append(y[..., prev:off])
        delta = F.linear(h[..., s * r : (s + 1) * r], lora_b[s * n : (s + 1) * n])
        parts.append(y[..., off : off + n] + scale * delta)
        prev = off + n
    parts.append(y[..., prev:])
    return torch.cat(parts, dim=-1)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Explicit ``softmax(q k^T * scale) v`` in fp32, cast back to q's dtype. q,k,v: (B, H, N, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, N, N)
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.float()).to(q.dtype)
