"""MAE decoder (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"), loadable from
the official checkpoints, plus the group-channel variant for multispectral inputs (SatMAE-style).

Attribute names equal the official MAE ones (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
``decoder_blocks.*``, ``decoder_norm``, ``decoder_pred``) so an official state dict loads by key.
Position embedding: MAE's fixed 2-D sin-cos table with a zero row for the class token (first half
of the channels encodes the column, second half the row); other grids are resampled like the
encoder's. Group-channel decoders add a per-group encoding to the spatial one (tokens are
group-major, like the encoder's): learned, or SatMAE's fixed sin-cos code of the group index in the
last 128 channels (the prefix tokens get the code of index G, models_mae_group_channels.py
L62, L95-97, L254-263); each group's own bands are predicted by a separate linear layer.

Loading (:func:`load_mae_decoder`) takes every tensor of an official decoder that fits; layers the
file cannot provide (group-channel prediction heads and group encoding, a prediction head for a
band count other than the file's) start from MAE's init and are reported as ``fresh``, as ExPLoRA
drops mismatching ``decoder_pred`` keys before loading (its mae/pretrain.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from engine.errors import UserError
from engine.model.patch_embed import SATMAE_DECODER_GROUP_CHANNELS, GroupEncoding, sincos_group_encoding
from engine.model.state_fit import state_diff

log = logging.getLogger(__name__)

DECODER_PREFIXES = (
    "decoder_embed.",
    "mask_token",
    "decoder_pos_embed",
    "decoder_blocks.",
    "decoder_norm.",
    "decoder_pred.",
    "decoder_group_embed",
)


def sincos_pos_embed_2d(dim: int, h: int, w: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed table: (h*w [+1], dim) float32, rows in raster order, zero row first for cls.

    Channels [0, dim/2) hold sin/cos of the column index, [dim/2, dim) of the row index, each as
    [sin(pos * omega_i) for i] + [cos(pos * omega_i) for i], omega_i = 10000^(-i / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )

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
    tokens ([cls][reg...]), which get the table's zero (class) row. group_encoding: 'learned' or
    'sincos' (SatMAE) for group-channel decoders.
    """

    decoder_pos_embed: torch.Tensor  # (1, 1 + h0*w0, D) buffer

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
        group_encoding: GroupEncoding = "learned",
    ):
        super().__init__()
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.patch_size = int(patch_size)
        self.group_chans = [int(c) for c in group_chans]
        self.num_prefix_tokens = int(num_prefix_tokens)
        dd = decoder_embed_dim
        self.decoder_embed = nn.Linear(embed_dim, dd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(dd, *self.grid_size).unsqueeze(0))
        norm = partial(nn.LayerNorm, eps=1e-6)
        # timm types norm_layer as a class; any callable returning a module works
        block = partial(Block, dd, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)  # type: ignore[arg-type]
        self.decoder_blocks = nn.ModuleList(block() for _ in range(decoder_depth))
        self.decoder_norm = norm(dd)
        p2 = self.patch_size**2
        if len(self.group_chans) == 1:
            self.decoder_pred: nn.Linear | nn.ModuleList = nn.Linear(dd, p2 * self.group_chans[0], bias=True)
            self.decoder_group_embed = None
        else:
            self.decoder_pred = nn.ModuleList(nn.Linear(dd, p2 * c, bias=True) for c in self.group_chans)
            G = len(self.group_chans)
            if group_encoding == "sincos":
                # G + 1 rows: one per group, the last for the prefix tokens (SatMAE's decoder_channel_embed)
                table = sincos_group_encoding(G + 1, dd, min(SATMAE_DECODER_GROUP_CHANNELS, dd))
                self.register_buffer("decoder_group_embed", table, persistent=False)
            else:
                self.decoder_group_embed = nn.Parameter(torch.zeros(G, dd))
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
        if isinstance(self.decoder_group_embed, nn.Parameter):
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
        prefix = prefix + pe[:, :1]
        if self.decoder_group_embed is not None:
            ge = self.decoder_group_embed.to(x.dtype)
            full = full + ge[None, :G, None, :]
            if ge.shape[0] > G:  # sin-cos: the prefix tokens get the code of index G
                prefix = prefix + ge[G]
        x = torch.cat([prefix, full.reshape(B, G * hw, dd)], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)[:, P:].reshape(B, G, hw, dd)
        if isinstance(self.decoder_pred, nn.Linear):  # one band group
            return [self.decoder_pred(x[:, 0])]
        return [pred(x[:, g]) for g, pred in enumerate(self.decoder_pred)]


def _decoder_keys(state: dict) -> dict:
    if isinstance(state.get("model"), dict):
        state = state["model"]
    out = {}
    for k, v in state.items():
        k = k[len("module.") :] if k.startswith("module.") else k
        if k.startswith(DECODER_PREFIXES):
            out[k] = v
    return out


def _fresh_keys(decoder: MAEDecoder, sd: dict) -> list[str]:
    """Decoder tensors a plain official file cannot provide: the prediction head when its shape
    differs (group-channel heads, another band count) and a learned group encoding."""
    own = decoder.state_dict()
    fresh = [k for k in own if k.startswith("decoder_group_embed")]
    pred = [k for k in own if k.startswith("decoder_pred.")]
    if any(k not in sd or sd[k].shape != own[k].shape for k in pred):
        fresh += pred
    return fresh


def load_mae_decoder(decoder: MAEDecoder, state: dict | None) -> list[str] | None:
    """Load official-MAE decoder tensors from ``state`` (a full MAE state dict, ``{'model': ...}``
    or decoder keys only).

    Returns None, leaving the init, when ``state`` has no decoder (MAE's ``mae_pretrain_*`` files hold
    the encoder only), else the names of the decoder tensors that start fresh (see the module
    docstring). Raises UserError naming every tensor whose shape does not fit the configuration.
    """
    sd = _decoder_keys(state or {})
    # a lone 'mask_token' is an encoder's (DINOv2), not a decoder
    if not any(k.startswith("decoder_") for k in sd):
        return None
    own = decoder.state_dict()
    if "decoder_pos_embed" in sd and sd["decoder_pos_embed"].shape != own["decoder_pos_embed"].shape:
        pe = sd["decoder_pos_embed"]
        n_old = pe.shape[1] - 1
        side = int(round(n_old**0.5))
        if side * side == n_old and pe.shape[2] == own["decoder_pos_embed"].shape[2]:
            sd["decoder_pos_embed"] = resample_abs_pos_embed(
                pe.float(), new_size=list(decoder.grid_size), old_size=[side, side], num_prefix_tokens=1
            )
    if "mask_token" not in sd:
        # some exports keep only the decoder_* tensors; the rest of the decoder is still worth loading
        log.warning("MAE decoder state has no mask_token: the decoder's mask token starts from its init")
        sd["mask_token"] = own["mask_token"]
    fresh = _fresh_keys(decoder, sd)
    for k in fresh:
        sd[k] = own[k]
    sd = {k: v for k, v in sd.items() if not (k.startswith("decoder_pred") and k not in own)}
    missing, unexpected, mismatched = state_diff(own, sd, "configured")
    if missing or unexpected or mismatched:
        width = sd["decoder_embed.weight"].shape[0] if "decoder_embed.weight" in sd else "?"
        depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
        parts = (
            ([f"{len(mismatched)} mismatched {mismatched[:4]}"] if mismatched else [])
            + ([f"{len(missing)} missing {missing[:4]}"] if missing else [])
            + ([f"{len(unexpected)} unexpected {unexpected[:4]}"] if unexpected else [])
        )
        raise UserError(
            "--objective.mae.decoder_embed_dim/decoder_depth: the weight file's MAE decoder does not fit the "
            f"configured one ({'; '.join(parts)}). The file's decoder has width {width} and {depth} blocks; "
            f"configured: width {decoder.decoder_embed.out_features}, {len(decoder.decoder_blocks)} blocks. "
            "Set the decoder settings to the file's (official MAE: 512, 8, 16 heads)"
        )
    decoder.load_state_dict(sd, strict=True)
    log.info(
        "MAE decoder loaded from the weight file (%d tensors%s)",
        len(sd) - len(fresh),
        f"; new: {sorted({k.rsplit('.', 1)[0] for k in fresh})}" if fresh else "",
    )
    return fresh
