"""ViT attention that computes its core through ``kernels.dispatch.attention``.

:class:`DispatchAttention` takes over the sub-modules of a timm ``Attention`` (``qkv``,
``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``) under the same
attribute names, so parameter names and shapes -- and therefore state dicts and timm checkpoints --
are unchanged. Only ``forward`` differs: the score matrix is never built here; the backend chosen by
``kernels.dispatch`` (SDPA, xformers, our Triton flash kernel or the fp32 reference) computes
``softmax(q k^T * scale) v`` from the (B, H, N, D) views timm produces.

Cases the dispatch signature does not cover go to PyTorch SDPA, which supports them exactly as
timm's own fused path does:

* attention dropout (``attn_drop.p > 0`` while training): SDPA with ``dropout_p`` (no flash kernel
  here applies dropout to the probabilities);
* an explicit ``attn_mask`` or ``is_causal=True`` from the caller.

``qkv`` is always called as a module, so wrapping it later (e.g. by ``engine.model.lora``) keeps
working; nothing here reads ``qkv.weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from kernels import dispatch


class DispatchAttention(nn.Module):
    """Multi-head self-attention over x: (B, N, C) -> (B, N, dim_out), core via kernels.dispatch.

    Built from an existing timm ``Attention`` (``DispatchAttention(timm_attn)``); the sub-modules
    are shared, not copied, so the swap costs no memory and keeps parameter identity (optimizer
    state, ``requires_grad`` flags and hooks carry over).
    """

    def __init__(self, src: Attention) -> None:
        super().__init__()
        self.num_heads = src.num_heads
        self.head_dim = src.head_dim
        self.attn_dim = src.attn_dim
        self.scale = src.scale
        # Same names and registration order as timm, so state_dict keys and order are identical.
        self.qkv = src.qkv
        self.q_norm = src.q_norm
        self.k_norm = src.k_norm
        self.attn_drop = src.attn_drop
        self.norm = src.norm
        self.gate = getattr(src, "gate", None)
        self.proj = src.proj
        self.proj_drop = src.proj_drop

    def _core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        """q, k, v: (B, H, N, D) -> (B, H, N, D)."""
        dropout_p = self.attn_drop.p if self.training else 0.0
        if dropout_p > 0.0 or attn_mask is not None or is_causal:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale
            )
        return dispatch.attention(q, k, v, self.scale)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x: (B, N, C) tokens; attn_mask: optional (.., N, N) bool/additive mask (SDPA semantics)."""
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        # (B, N, 3*H*D) -> (3, B, H, N, D): strided views into the projection output, as in timm;
        # the backends take strides, so no copy is made here.
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self._core(q, k, v, attn_mask, is_causal)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, core=kernels.dispatch.attention"


def use_dispatch_attention(vit: VisionTransformer) -> int:
    """Replace every timm ``Attention`` in ``vit.blocks`` by :class:`DispatchAttention`, in place.

    Returns how many modules were swapped (0 when already swapped, so calling twice is harmless).
    Parameters are shared with the replaced modules, so ``vit.state_dict()`` is unchanged.
    """
    swapped = 0
    for block in vit.blocks:
        for name, child in list(block.named_children()):
            if isinstance(child, Attention):
                setattr(block, name, DispatchAttention(child))
                swapped += 1
    return swapped
