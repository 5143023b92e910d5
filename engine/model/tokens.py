"""Token-level forward passes over a timm VisionTransformer, for the self-supervised objectives.

timm's ``forward_features`` cannot take iBOT masks (DINOv2 replaces masked patch embeddings by a
learned mask token *before* adding position embeddings) nor run MAE's encoder on visible tokens
only. These functions do, on an unmodified timm model, so the model's state dict stays loadable by
any timm user.

Patch-embed contract (plain timm ``PatchEmbed`` built with ``dynamic_img_size=True``, or our
group-channel embed): ``vit.patch_embed(x)`` returns (B, h, w, D) or (B, G, h, w, D) for G band
groups, and ``vit.patch_embed.grid_size`` is the grid the position embedding was trained for.
Token order is group-major: token ``g*h*w + i`` is spatial cell i of group g. The spatial position
embedding is shared by all groups (the group embed adds the spectral identity).
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint


def num_groups(vit: VisionTransformer) -> int:
    return int(getattr(vit.patch_embed, "num_groups", 1))


def _pos_embeds(vit: VisionTransformer, grid: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split ``vit.pos_embed`` into (prefix part (1, P, D) or None, patch part resampled to (1, h*w, D))."""
    pe = vit.pos_embed
    if pe is None:
        return None, None
    n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    prefix, patch = pe[:, :n_prefix], pe[:, n_prefix:]
    old = tuple(vit.patch_embed.grid_size)
    if tuple(grid) != old:
        patch = resample_abs_pos_embed(patch, new_size=list(grid), old_size=list(old), num_prefix_tokens=0)
    return (prefix if n_prefix else None), patch


def _assemble(
    vit: VisionTransformer,
    t: torch.Tensor,
    grid: tuple[int, int],
    mask: torch.Tensor | None,
    mask_token: torch.Tensor | None,
    ids_keep: torch.Tensor | None,
) -> torch.Tensor:
    """Patch tokens t (B, G*h*w, D) -> [prefix][patch] tokens, with every tensor that lives on the
    ViT itself (mask token, position embedding, cls/register tokens) read here."""
    B, _, D = t.shape
    h, w = grid
    G = t.shape[1] // (h * w)
    if mask is not None:
        if mask_token is None:
            mask_token = getattr(vit, "mask_token", None)
        if mask_token is None:
            raise ValueError("embed(): a mask needs a mask_token (the model has none)")
        t = torch.where(mask.unsqueeze(-1), mask_token.to(t.dtype).reshape(1, 1, D), t)
    prefix_pe, patch_pe = _pos_embeds(vit, (h, w))
    if patch_pe is not None:
        t = (t.view(B, G, h * w, D) + patch_pe.unsqueeze(1)).view(B, G * h * w, D)
    if ids_keep is not None:
        t = torch.gather(t, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    prefix = []
    if vit.cls_token is not None:
        prefix.append(vit.cls_token.expand(B, -1, -1))
    if vit.reg_token is not None:
        prefix.append(vit.reg_token.expand(B, -1, -1))
    if prefix:
        p = torch.cat(prefix, dim=1)
        if prefix_pe is not None:
            p = p + prefix_pe
        t = torch.cat([p, t], dim=1)
    return t


class TokenAssembly(nn.Module):
    """:func:`_assemble` as a parameter-free submodule of the ViT (``vit.token_assembly``, attached by
    ``engine.model.architecture.create_vit``; no state-dict keys).

    Why a module: under DeepSpeed ZeRO-3 a parameter read outside its module's forward is gathered
    on access and registered with the module running at that moment. Read here, the ViT's own
    tensors are gathered for this call and released after it, like any submodule's weights; read
    from an objective's forward they would stay gathered until that forward ends, which breaks the
    EMA teacher's swap of trainable tensors (engine/objectives/teacher.py).
    """

    def forward(
        self,
        vit: VisionTransformer,
        t: torch.Tensor,
        grid: tuple[int, int],
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _assemble(vit, t, grid, mask, mask_token, ids_keep)


def embed(
    vit: VisionTransformer,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
    ids_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images -> input tokens of the first block.

    x: (B, C, H, W). mask: (B, L) bool, True = replace that patch embedding by ``mask_token`` (D,)
    (iBOT; None = the model's own ``vit.mask_token``, as DINOv2 checkpoints carry one). ids_keep:
    (B, L_keep) long, keep only these patch tokens (MAE encoder), after the position embedding so
    each kept token keeps its position. Returns (B, P + L', D) with the P prefix tokens
    ([cls][reg...]) first.
    """
    t = vit.patch_embed(x)
    if t.dim() == 4:
        t = t.unsqueeze(1)  # (B, 1, h, w, D)
    B, G, h, w, D = t.shape
    t = t.reshape(B, G * h * w, D)
    assembly = getattr(vit, "token_assembly", None)
    if isinstance(assembly, TokenAssembly):
        t = assembly(vit, t, (h, w), mask, mask_token, ids_keep)
    else:  # a timm model built elsewhere (no ZeRO-3 concerns)
        t = _assemble(vit, t, (h, w), mask, mask_token, ids_keep)
    t = vit.pos_drop(t)
    return vit.norm_pre(t)


def run_blocks(vit: VisionTransformer, t: torch.Tensor) -> torch.Tensor:
    """Apply the transformer blocks (with per-block activation checkpointing when enabled)."""
    use_ckpt = getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled()
    for blk in vit.blocks:
        t = checkpoint(blk, t, use_reentrant=False) if use_ckpt else blk(t)
    return t


def forward_tokens(
    vit: VisionTransformer,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
    ids_keep: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Full encoder pass returning normalised tokens split by role.

    Returns ``cls`` (B, D), ``reg`` (B, R, D) (R may be 0), ``patch`` (B, L', D) and ``prenorm``
    (B, P + L', D) — all from the final norm except ``prenorm``.
    """
    t = run_blocks(vit, embed(vit, x, mask, mask_token, ids_keep))
    out = vit.norm(t)
    # timm's counts, not the token tensors: reading those here would gather them under ZeRO-3
    n_reg = int(vit.num_reg_tokens)
    n_cls = int(vit.has_class_token)
    P = n_cls + n_reg
    cls = out[:, 0] if n_cls else out[:, P:].mean(dim=1)
    return {"cls": cls, "reg": out[:, n_cls:P], "patch": out[:, P:], "prenorm": t}


POOLS = ("cls", "cls_avgpool")


def pool_tokens(tokens: dict[str, torch.Tensor], pool: str) -> torch.Tensor:
    """Embedding of :func:`forward_tokens` output for probes, kNN and classification heads:
    'cls' (B, D), or 'cls_avgpool' (B, 2D) = cls concatenated with the mean patch token (DINOv2)."""
    if pool == "cls":
        return tokens["cls"]
    if pool == "cls_avgpool":
        return torch.cat([tokens["cls"], tokens["patch"].mean(dim=1)], dim=-1)
    raise ValueError(f"unknown pool {pool!r}; use one of {POOLS}")


def pooled_features(vit: VisionTransformer, x: torch.Tensor, avgpool: bool = False) -> torch.Tensor:
    """Frozen-feature embedding of images ``x``: cls (B, D), or [cls, mean patch] (B, 2D)."""
    return pool_tokens(forward_tokens(vit, x), "cls_avgpool" if avgpool else "cls")
