"""LoRA (Hu et al., arXiv 2106.09685) as a wrapper around an existing ``nn.Linear``.

``LoRALinear(base, rank, alpha, dropout)`` reuses ``base``'s weight and bias Parameters (no copy),
so the wrapped model keeps timm's state-dict keys (``...qkv.weight``, ``...qkv.bias``) and only adds
``...qkv.lora_a`` / ``...qkv.lora_b``. The forward is
``y = x W^T + b + (alpha / r) * (drop(x) A^T) B^T`` computed by :func:`kernels.dispatch.lora_linear`
(the fast pure-torch path, or the fused Triton kernel where this machine's kernel record says it
passed and was faster).

Output segments put independent adapters on slices of one fused projection: LoRA on q and v of
timm's ``qkv`` (N = 3*dim) is ``segments=(0, 2*dim), segment_width=dim`` with ``A = [A_q; A_v]``
(2r, K) and ``B = [B_q; B_v]`` (2*dim, r), exactly two separate q and v adapters.

Merging lives beside the layer, as in litgpt's ``lora.py``: :meth:`LoRALinear.merged_weight` (the
folded weight, for exports), :meth:`LoRALinear.merge` / ``unmerge`` (in place), and the module-level
:func:`mark_only_lora_as_trainable`, :func:`merge_lora_weights`, :func:`lora_modules` and
:func:`unwrap_lora` (merge, then plain ``nn.Linear`` modules: timm's exact modules and keys).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch


class LoRALinear(nn.Linear):
    """``base`` (frozen) plus a rank-``rank`` update on all of its output or on ``segments``.

    base: the layer to adapt; its Parameters are shared, not copied. segments: start offsets along
    the output features of the adapted slices (None = the whole output), each ``segment_width``
    wide. A: (S*r, in_features), Kaiming-uniform like nn.Linear; B: (S*n, r), zeros, so the module
    equals ``base`` exactly until B trains.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        segments: Sequence[int] | None = None,
        segment_width: int | None = None,
    ):
        # nn.Linear.__init__ would allocate a fresh weight; we adopt base's Parameters instead.
        nn.Module.__init__(self)
        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        width = self.out_features
        if segments is not None:
            segments = tuple(int(s) for s in segments)
            if segment_width is None or segment_width <= 0:
                raise ValueError("LoRA output segments need a positive segment_width")
            width = segment_width
            ends = [s + width for s in segments]
            if any(b < a for a, b in zip(ends, segments[1:])) or segments[0] < 0 or ends[-1] > self.out_features:
                raise ValueError(f"segments {segments} x {width} do not tile {self.out_features} outputs")
        self.segments = segments
        self.segment_width = width
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank
        self.dropout = float(dropout)
        n_seg = len(segments) if segments is not None else 1
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(n_seg * self.rank, self.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(n_seg * self.segment_width, self.rank, device=device, dtype=dtype))
        self.merged = False
        self.reset_lora_parameters()

    @property
    def num_segments(self) -> int:
        return len(self.segments) if self.segments is not None else 1

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (as nn.Linear's weight, per segment), B zeros."""
        if self.lora_a.is_meta:
            return
        for s in range(self.num_segments):
            nn.init.kaiming_uniform_(self.lora_a.data[s * self.rank : (s + 1) * self.rank], a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return dispatch.lora_linear(
            x, self.weight, self.bias, self.lora_a, self.lora_b, self.scale, self.dropout, self.training, self.segments
        )

    def segment_deltas(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(row offset, scale * B_s A_s of shape (n, in_features)) per segment, in fp32."""
        r, n = self.rank, self.segment_width
        a, b = self.lora_a.detach().float(), self.lora_b.detach().float()
        for s, off in enumerate(self.segments if self.segments is not None else (0,)):
            yield off, self.scale * (b[s * n : (s + 1) * n] @ a[s * r : (s + 1) * r])

    def delta_weight(self) -> torch.Tensor:
        """The full (out_features, in_features) update ``W_merged - W`` in fp32."""
        delta = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.weight.device)
        for off, d in self.segment_deltas():
            delta[off : off + d.shape[0]] += d
        return delta

    def merged_weight(self) -> torch.Tensor:
        """``W + scale * B A`` in ``weight``'s dtype (fp32 arithmetic), without changing the module."""
        return (self.weight.detach().float() + self.delta_weight()).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight``; forward then skips the LoRA branch."""
        if not self.merged:
            self.weight.data.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (equal to the original weight up to fp rounding)."""
        if self.merged:
            self.weight.data.copy_((self.weight.data.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        seg = f", segments={self.segments}x{self.segment_width}" if self.segments is not None else ""
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}, "
            f"dropout={self.dropout:g}{seg}, merged={self.merged}"
        )


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(qualified name, module) of every LoRALinear in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def is_lora_param(name: str) -> bool:
    """True for the adapter tensors of a LoRALinear (``...lora_a`` / ``...lora_b``)."""
    return name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Freeze everything except the LoRA A/B tensors."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_param(name))


def merge_lora_weights(model: nn.Module) -> None:
    """Merge every LoRALinear in place (inference, export)."""
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora_weights(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()


def unwrap_lora(model: nn.Module) -> int:
    """Merge every LoRALinear and put a plain ``nn.Linear`` holding the merged weight in its place.

    The result has exactly timm's modules and state-dict keys. Returns the number replaced.
    """
    count = 0
    for name, m in list(lora_modules(model)):
        m.merge()
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        setattr(parent, name.rpartition(".")[2], plain)
        count += 1
    return count
