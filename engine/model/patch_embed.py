"""Multispectral patch embeddings: RGB weights adapted to C bands, and SatMAE-style band groups.

(a) Plain: timm's conv ``PatchEmbed`` with ``in_chans=C``; the pre-trained RGB kernels become C-band
kernels by :func:`adapt_rgb_weight` ('timm': timm's ``adapt_input_conv``, which cycles the RGB
kernels over the bands and scales by 3/C; 'mean': every band gets the mean RGB kernel, scaled by
3/C). Either way a constant image gives the same embedding as its RGB counterpart.

(b) Group-channel (SatMAE, arXiv 2207.08051; the ExPLoRA MAE Sentinel-2 models): the bands are split
into G groups, each group has its own conv patch embed, a group (spectral) encoding is added, and
the G token grids go to the encoder side by side: ``forward`` returns (B, G, h, w, D), which
``engine.model.tokens`` flattens group-major and gives every group the same spatial position
embedding. The group encoding is learned ('learned'), or SatMAE's fixed one ('sincos': the 1-D
sin-cos code of the group index in the last 256 channels, zeros elsewhere; SatMAE concatenates it
after a (D - 256)-wide spatial code, models_mae_group_channels.py L41-43, L83-89, L195-204, while
here the spatial code is the base model's full-width position embedding).

Sentinel-2 default: of the 13 L1C/L2A bands, B1, B9 and B10 (60 m atmospheric bands) are dropped,
leaving ``S2_KEPT_BANDS`` in this order; the groups are (B2,B3,B4,B8) visible+NIR at 10 m,
(B5,B6,B7,B8A) red edge at 20 m and (B11,B12) SWIR at 20 m, as indices into the 10 kept bands.

A patch embed that did not exist in the pre-trained model (group-channel always, a plain one whose
weights were adapted to C != 3 bands) carries ``fresh = True``; the ExPLoRA recipe trains it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

S2_KEPT_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
S2_DEFAULT_GROUPS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 6), (3, 4, 5, 7), (8, 9))

AdaptMode = Literal["timm", "mean"]
GroupEncoding = Literal["learned", "sincos"]
# SatMAE's channel_embed / decoder_channel_embed widths (models_mae_group_channels.py L22-23)
SATMAE_GROUP_CHANNELS = 256
SATMAE_DECODER_GROUP_CHANNELS = 128


def sincos_group_encoding(num_groups: int, dim: int, channels: int) -> torch.Tensor:
    """(num_groups, dim) float32: zeros, except the last ``channels`` entries of row g hold
    [sin(g w_i)] + [cos(g w_i)], w_i = 10000^(-i / (channels / 2)) (SatMAE's
    get_1d_sincos_pos_embed_from_grid over the group index)."""
    if channels % 2 or not 0 < channels <= dim:
        raise ValueError(f"sin-cos group encoding needs an even width <= {dim}, got {channels}")
    half = channels // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angle = torch.arange(num_groups, dtype=torch.float64)[:, None] * omega[None]
    out = torch.zeros(num_groups, dim, dtype=torch.float64)
    out[:, dim - channels :] = torch.cat([angle.sin(), angle.cos()], dim=1)
    return out.float()


def adapt_rgb_weight(weight: torch.Tensor, in_chans: int, mode: AdaptMode = "timm") -> torch.Tensor:
    """weight: (D, c0, p, p) pre-trained kernels (c0 = 3 for RGB) -> (D, in_chans, p, p)."""
    c0 = weight.shape[1]
    if in_chans == c0:
        return weight
    if mode == "timm":
        from timm.models import adapt_input_conv

        return adapt_input_conv(in_chans, weight)
    if mode == "mean":
        w = weight.float().mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) * (c0 / in_chans)
        return w.to(weight.dtype)
    raise ValueError(f"unknown patch-embed adaptation {mode!r}; use 'timm' or 'mean'")


def default_band_groups(in_chans: int) -> list[list[int]]:
    """The Sentinel-2 groups for 10 bands; any other band count needs explicit groups."""
    if in_chans != len(S2_KEPT_BANDS):
        raise ValueError(
            f"the default band groups are for the {len(S2_KEPT_BANDS)} Sentinel-2 bands "
            f"{','.join(S2_KEPT_BANDS)}; got {in_chans} bands"
        )
    return [list(g) for g in S2_DEFAULT_GROUPS]


class GroupChannelPatchEmbed(nn.Module):
    """Per-group conv patch embeds + group embedding: (B, C, H, W) -> (B, G, H/p, W/p, D).

    band_groups: band indices (into the C input bands) of each group; groups may overlap or leave
    bands out. Attributes follow timm's ``PatchEmbed`` (``patch_size``, ``img_size``, ``grid_size``,
    ``num_patches`` = spatial cells, ``in_chans``) plus ``num_groups`` and ``band_groups``.
    Parameters: ``proj.{g}.weight`` (D, c_g, p, p), ``proj.{g}.bias`` (D,), ``group_embed`` (G, D)
    (encoding 'learned'; with 'sincos' it is a fixed, non-persistent buffer).
    """

    fresh = True

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        band_groups: Sequence[Sequence[int]] | None = None,
        bias: bool = True,
        encoding: GroupEncoding = "learned",
    ):
        super().__init__()
        groups = [
            list(map(int, g)) for g in (band_groups if band_groups is not None else default_band_groups(in_chans))
        ]
        bad = [b for g in groups for b in g if not 0 <= b < in_chans]
        if not groups or any(not g for g in groups) or bad:
            raise ValueError(f"band groups {groups} must be non-empty lists of indices in [0, {in_chans})")
        self.band_groups = groups
        self.num_groups = len(groups)
        self.in_chans = int(in_chans)
        self.embed_dim = int(embed_dim)
        self.patch_size = (int(patch_size), int(patch_size))
        self.img_size = (int(img_size), int(img_size))
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = False
        self.proj = nn.ModuleList(
            nn.Conv2d(len(g), embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias) for g in groups
        )
        self.encoding = encoding
        if encoding == "sincos":
            table = sincos_group_encoding(self.num_groups, embed_dim, min(SATMAE_GROUP_CHANNELS, embed_dim))
            self.register_buffer("group_embed", table, persistent=False)
        elif encoding == "learned":
            self.group_embed = nn.Parameter(torch.zeros(self.num_groups, embed_dim))
        else:
            raise ValueError(f"unknown group encoding {encoding!r}; use 'learned' or 'sincos'")
        self.reset_group_embed()

    def reset_group_embed(self) -> None:
        if isinstance(self.group_embed, nn.Parameter) and not self.group_embed.is_meta:
            nn.init.trunc_normal_(self.group_embed, std=0.02)

    @torch.no_grad()
    def init_from_rgb(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: AdaptMode = "timm") -> None:
        """Start every group's conv from pre-trained RGB kernels (D, 3, p, p), adapted to its bands."""
        for conv, g in zip(self.proj, self.band_groups):
            assert isinstance(conv, nn.Conv2d)  # built in __init__
            conv.weight.copy_(adapt_rgb_weight(weight, len(g), mode).to(conv.weight.dtype))
            if conv.bias is not None and bias is not None:
                conv.bias.copy_(bias.to(conv.bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, G, h, w, D) with h = H // p, w = W // p."""
        tokens = [conv(x[:, g]).permute(0, 2, 3, 1) for conv, g in zip(self.proj, self.band_groups)]
        t = torch.stack(tokens, dim=1)  # (B, G, h, w, D)
        return t + self.group_embed.to(t.dtype)[None, :, None, None, :]

    def extra_repr(self) -> str:
        return f"groups={self.band_groups}, patch={self.patch_size[0]}, dim={self.embed_dim}, encoding={self.encoding}"


def use_group_channel_embed(
    vit: VisionTransformer,
    band_groups: Sequence[Sequence[int]] | None = None,
    in_chans: int | None = None,
    encoding: GroupEncoding = "learned",
) -> GroupChannelPatchEmbed:
    """Replace ``vit.patch_embed`` by a group-channel embed of the same patch size, grid and width.

    The spatial ``vit.pos_embed`` is kept (shared by all groups). in_chans: input bands (default:
    the current patch embed's). The new embed starts from ``vit.patch_embed``'s kernels adapted per
    group when those are RGB (c = 3), so a pre-trained model's spatial filters are reused.
    """
    old = vit.patch_embed
    c_old = old.proj.weight.shape[1]
    pe = GroupChannelPatchEmbed(
        old.img_size[0],
        old.patch_size[0],
        in_chans or c_old,
        vit.embed_dim,
        band_groups,
        bias=old.proj.bias is not None,
        encoding=encoding,
    )
    pe.to(device=old.proj.weight.device, dtype=old.proj.weight.dtype)
    if c_old == 3 and not old.proj.weight.is_meta:
        pe.init_from_rgb(old.proj.weight, old.proj.bias)
    vit.patch_embed = pe
    return pe
