"""MAE decoder (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"), loadable from
the official checkpoints, plus the group-channel variant for multispectral inputs (SatMAE-style).

Attribute names equal the official MAE ones (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
``decoder_blocks.*``, ``decoder_norm``, ``decoder_pred``) so an official state dict loads by key.
Position embedding: MAE's fixed 2-D sin-cos table with a zero row for the class token (first half
of the channels encodes the column, second half the row); other grids are resampled like the
encoder's. Group-channel decoders add a learned per-group embedding to the spatial one (tokens are
group-major, like the encoder's) and predict each group's own bands with a separate linear layer.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Optional, Sequence

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from engine.errors import UserError

log = logging.getLogger(__name__)

DECODER_PREFIXES = ("decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                    "decoder_pred.", "decoder_group_embed")


def sincos_pos_embed_2d(dim: int, h: int, w: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed table: (h*w [+1], dim) float32, rows in raster order, zero row first for cls.

    Channels [0, dim/2) hold sin/cos of the column index, [dim/2, dim) of the row index, each as
    [sin(pos * omega_i) for i] + [cos(pos * omega_i) for i], omega_i = 10000^(-i / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        a = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([a.sin(), a.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1).float()
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)
    return emb


class MAEDecoder(nn.Module):
    """Encoder tokens (visible only) -> pixel predictions for every patch token.

    embed_dim: encoder width D. grid_size: (h0, w0) native patch grid. patch_size: p.
    group_chans: bands per group, [C] for a plain patch embed. num_prefix_tokens: encoder prefix
    tokens ([cls][reg...]), which get the table's zero (class) row.
    """

    def __init__(
        self,
        embed_dim: int,
        grid_size: tuple[int, int],
        patch_size: int,
        group_chans: Sequence[int],
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_prefix_tokens: int = 1,
    ):
        super().__init__()
        self.grid_size = tuple(int(g) for g in grid_size)
        self.patch_size = int(patch_size)
        self.group_chans = [int(c) for c in group_chans]
        self.num_prefix_tokens = int(num_prefix_tokens)
        dd = decoder_embed_dim
        self.decoder_embed = nn.Linear(embed_dim, dd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(dd, *self.grid_size).unsqueeze(0))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            Block(dd, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(decoder_depth))
        self.decoder_norm = norm(dd)
        p2 = self.patch_size ** 2
        if len(self.group_chans) == 1:
            self.decoder_pred = nn.Linear(dd, p2 * self.group_chans[0], bias=True)
            self.decoder_group_embed = None
        else:
            self.decoder_pred = nn.ModuleList(nn.Linear(dd, p2 * c, bias=True) for c in self.group_chans)
            self.decoder_group_embed = nn.Parameter(torch.zeros(len(self.group_chans), dd))
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's init: xavier-uniform linears, unit LayerNorms, N(0, 0.02) mask token
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.decoder_group_embed is not None:
            nn.init.normal_(self.decoder_group_embed, std=0.02)

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        pe = self.decoder_pos_embed
        if tuple(grid) != self.grid_size:
            pe = resample_abs_pos_embed(pe, new_size=list(grid), old_size=list(self.grid_size), num_prefix_tokens=1)
        return pe

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """latent: (B, P + L_keep, D) normalised encoder output; ids_restore: (B, L) with
        L = G*h*w, the inverse of the masking shuffle; grid: (h, w).

        Returns one prediction per band group: (B, h*w, p*p*c_g), values in (p, p, c) order.
        """
        B = latent.shape[0]
        P = self.num_prefix_tokens
        x = self.decoder_embed(latent)
        dd = x.shape[-1]
        prefix, vis = x[:, :P], x[:, P:]
        L = ids_restore.shape[1]
        full = torch.cat([vis, self.mask_token.to(x.dtype).expand(B, L - vis.shape[1], dd)], dim=1)
        full = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))
        pe = self._pos_embed(grid).to(x.dtype)
        G, hw = len(self.group_chans), grid[0] * grid[1]
        full = full.view(B, G, hw, dd) + pe[:, None, 1:]
        if self.decoder_group_embed is not None:
            full = full + self.decoder_group_embed.to(x.dtype)[None, :, None, :]
        x = torch.cat([prefix + pe[:, :1], full.reshape(B, G * hw, dd)], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)[:, P:].reshape(B, G, hw, dd)
        if self.decoder_group_embed is None:
            return [self.decoder_pred(x[:, 0])]
        return [pred(x[:, g]) for g, pred in enumerate(self.decoder_pred)]


def _decoder_keys(state: dict) -> dict:
    if isinstance(state.get("model"), dict):
        state = state["model"]
    out = {}
    for k, v in state.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith(DECODER_PREFIXES):
            out[k] = v
    return out


def load_mae_decoder(decoder: MAEDecoder, state: Optional[dict]) -> bool:
    """Load official-MAE decoder tensors from ``state`` (a full MAE state dict, ``{'model': ...}``
    or decoder keys only). Returns False, leaving the init, when ``state`` has no decoder (MAE's
    ``mae_pretrain_*`` files hold the encoder only). Raises UserError when the decoder's shape does
    not match the configuration, naming the settings to change."""
    sd = _decoder_keys(state or {})
    # a lone 'mask_token' is an encoder's (DINOv2), not a decoder
    if not any(k.startswith("decoder_") for k in sd):
        log.info("MAE decoder initialised from scratch (the checkpoint has no decoder)")
        return False
    own = decoder.state_dict()
    if "decoder_pos_embed" in sd and sd["decoder_pos_embed"].shape != own["decoder_pos_embed"].shape:
        pe = sd["decoder_pos_embed"]
        n_old = pe.shape[1] - 1
        side = int(round(n_old ** 0.5))
        if side * side == n_old and pe.shape[2] == own["decoder_pos_embed"].shape[2]:
            sd["decoder_pos_embed"] = resample_abs_pos_embed(
                pe.float(), new_size=list(decoder.grid_size), old_size=[side, side], num_prefix_tokens=1)
    if "mask_token" not in sd:
        # some exports keep only the decoder_* tensors; the rest of the decoder is still worth loading
        log.warning("MAE decoder state has no mask_token: the decoder's mask token starts from its init")
        sd["mask_token"] = own["mask_token"]
    bad = [k for k in own if k not in sd or sd[k].shape != own[k].shape]
    extra = [k for k in sd if k not in own]
    if bad or extra:
        width = sd["decoder_embed.weight"].shape[0] if "decoder_embed.weight" in sd else "?"
        depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
        raise UserError(
            f"--objective.mae.decoder_embed_dim/--objective.mae.decoder_depth: the checkpoint's MAE decoder "
            f"(width {width}, {depth} blocks) does not fit the configured one (width "
            f"{decoder.decoder_embed.out_features}, {len(decoder.decoder_blocks)} blocks); first mismatching "
            f"tensor: {(bad or extra)[0]!r}. Set the decoder settings to the checkpoint's (MAE: 512, 8, 16 heads)")
    decoder.load_state_dict(sd, strict=True)
    log.info("MAE decoder loaded from the checkpoint (%d tensors)", len(sd))
    return True
