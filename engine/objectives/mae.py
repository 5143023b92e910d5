"""MAE objective: random masking, encoder on visible tokens, decoder, loss on masked patches only.

ExPLoRA continues MAE pre-training with the encoder under the recipe (frozen base, LoRA, unfrozen
blocks). The decoder of a ``mae_visualize_*`` file is loaded; with ``decoder_lora_rank`` > 0 it is
frozen except LoRA on its attention's q,v, its LayerNorms and the layers the file lacks (ExPLoRA's
mae/pretrain.py: ``--decoder_lora_rank 8``, the freeze loop keeps only "lora", "norm", cls_token
and the unfrozen encoder blocks). A decoder that starts from scratch trains fully. With a
group-channel patch embedding the encoder has G*h*w group-major tokens: masking picks among all of
them (a cell can be visible in one band group and hidden in another), and the decoder reconstructs
every group from its own bands.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer

from engine.config import DEFAULT_LORA_TARGETS, MAEConfig
from engine.model.explora import NORM_TYPES, add_lora_to_blocks
from engine.model.layer_decay import LayerDecay
from engine.model.tokens import forward_tokens, num_groups
from engine.objectives.mae_decoder import MAEDecoder, load_mae_decoder
from engine.objectives.monitor import CollapseMonitor
from engine.objectives.objective import Objective

log = logging.getLogger(__name__)


def random_masking(
    batch: int, length: int, mask_ratio: float, device: torch.device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample uniform masking of ``length`` tokens, keeping int(length * (1 - ratio)).

    Returns ids_keep (B, L_keep) long, ids_restore (B, L) long (position of each original token in
    [kept..., masked...]) and mask (B, L) bool, True = hidden from the encoder.
    """
    n_keep = max(1, int(length * (1.0 - mask_ratio)))
    noise = torch.rand(batch, length, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = ids_restore >= n_keep
    return ids_keep, ids_restore, mask


def patchify(
    images: torch.Tensor, patch_size: int, band_groups: Sequence[Sequence[int]] | None = None
) -> list[torch.Tensor]:
    """images: (B, C, H, W) -> per group (B, h*w, p*p*c_g) in MAE's (p, p, c) value order.

    band_groups: band indices of each group (None = one group of all bands).
    """
    B, C, H, W = images.shape
    p = patch_size
    h, w = H // p, W // p
    groups = band_groups or [list(range(C))]
    out = []
    for g in groups:
        x = images[:, list(g), : h * p, : w * p]
        x = x.reshape(B, len(g), h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # B h w p p c
        out.append(x.reshape(B, h * w, p * p * len(g)))
    return out


def masked_mse(
    preds: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    mask: torch.Tensor,
    norm_pix_loss: bool,
    pix_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean over masked tokens of the per-token mean squared error.

    preds/targets: per group (B, h*w, V_g); mask: (B, G*h*w) bool, group-major. norm_pix_loss:
    standardise each target token first (eps 1e-6) by its own mean and variance (MAE's
    models_mae.py L205-208), or by ``pix_stats`` = (mean, var), each (B, h*w, 1), of all bands of
    the spatial patch (SatMAE's forward_loss, models_mae_group_channels.py L300-303). fp32.
    """
    errs = []
    for pred, tgt in zip(preds, targets):
        tgt = tgt.float()
        if norm_pix_loss:
            mean, var = (
                pix_stats if pix_stats is not None else (tgt.mean(dim=-1, keepdim=True), tgt.var(dim=-1, keepdim=True))
            )
            tgt = (tgt - mean) / (var + 1e-6) ** 0.5
        errs.append(((pred.float() - tgt) ** 2).mean(dim=-1))  # (B, h*w)
    err = torch.cat(errs, dim=1)  # (B, G*h*w), group-major like the mask
    m = mask.to(err.dtype)
    return (err * m).sum() / m.sum().clamp(min=1.0)


def patch_stats(images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased var) over all bands and pixels of each spatial patch: each (B, h*w, 1), fp32."""
    (full,) = patchify(images.float(), patch_size)
    return full.mean(dim=-1, keepdim=True), full.var(dim=-1, keepdim=True)


def _band_groups(vit: VisionTransformer, band_groups: Sequence[Sequence[int]] | None) -> list[list[int]] | None:
    G = num_groups(vit)
    groups = band_groups if band_groups is not None else getattr(vit.patch_embed, "band_groups", None)
    if G == 1:
        return None
    if groups is None or len(groups) != G:
        raise ValueError(
            f"group-channel model with {G} groups needs band_groups "
            "(vit.patch_embed.band_groups or the band_groups argument)"
        )
    return [list(map(int, g)) for g in groups]


def _in_chans(vit: VisionTransformer) -> int:
    pe = vit.patch_embed
    if getattr(pe, "in_chans", None):
        return int(pe.in_chans)
    return int(pe.proj.weight.shape[1])


class MAEObjective(Objective):
    """Encoder (the ExPLoRA ViT) + MAE decoder + masked reconstruction loss.

    vit: timm VisionTransformer (dynamic_img_size), recipe applied. decoder_state: optional MAE
    state dict holding official decoder keys. band_groups: band indices per group for a
    group-channel patch embed (default ``vit.patch_embed.band_groups``). train_norms: the decoder's
    LayerNorms train under decoder LoRA (explora.train_norms). layer_decay: the encoder's
    layer-wise lr decay (the decoder gets 1).
    """

    def __init__(
        self,
        vit: VisionTransformer,
        cfg: MAEConfig,
        decoder_state: dict | None = None,
        band_groups: Sequence[Sequence[int]] | None = None,
        train_norms: bool = True,
        layer_decay: LayerDecay = LayerDecay(),
    ):
        super().__init__()
        self.vit = vit
        self.cfg = cfg
        self.layer_decay = layer_decay
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.band_groups = _band_groups(vit, band_groups)
        chans = [len(g) for g in self.band_groups] if self.band_groups else [_in_chans(vit)]
        self.decoder = MAEDecoder(
            vit.embed_dim,
            tuple(vit.patch_embed.grid_size),
            self.patch_size,
            chans,
            cfg.decoder_embed_dim,
            cfg.decoder_depth,
            cfg.decoder_num_heads,
            num_prefix_tokens=vit.num_prefix_tokens,
            group_encoding=getattr(vit.patch_embed, "encoding", "learned"),
        )
        fresh = load_mae_decoder(self.decoder, decoder_state)
        self.decoder_loaded = fresh is not None
        if fresh is None:
            log.warning(
                "MAE decoder starts from scratch and trains fully: the weight file has no decoder "
                "(MAE's mae_pretrain_* files hold the encoder only; the mae_visualize_* files include it)%s",
                "; objective.mae.decoder_lora_rank is ignored" if cfg.decoder_lora_rank else "",
            )
        elif cfg.decoder_lora_rank > 0:
            self._decoder_lora(fresh, train_norms)
        self.monitor = CollapseMonitor()

    def _decoder_lora(self, fresh: Sequence[str], train_norms: bool) -> None:
        """Freeze the loaded decoder, then train LoRA on its attention's q,v, its norms and ``fresh``."""
        dec = self.decoder
        dec.requires_grad_(False)
        add_lora_to_blocks(
            list(dec.decoder_blocks), DEFAULT_LORA_TARGETS, self.cfg.decoder_lora_rank, self.cfg.decoder_lora_alpha
        )
        for m in dec.modules():
            if train_norms and isinstance(m, NORM_TYPES):
                m.requires_grad_(True)
        params = dict(dec.named_parameters())
        for k in fresh:
            if k in params:
                params[k].requires_grad_(True)
        n_train = sum(p.numel() for p in dec.parameters() if p.requires_grad)
        log.info(
            "MAE decoder: LoRA r=%d on q,v of %d blocks%s%s; %s of %s decoder parameters train",
            self.cfg.decoder_lora_rank,
            len(dec.decoder_blocks),
            ", norms" if train_norms else "",
            f", new {sorted({k.rsplit('.', 1)[0] for k in fresh})}" if fresh else "",
            f"{n_train:,}",
            f"{sum(p.numel() for p in dec.parameters()):,}",
        )

    def lr_multiplier(self, name: str) -> float:
        """Layer-wise lr factor of trainable ``name`` (encoder only; the decoder gets 1)."""
        return self.layer_decay.for_objective(name, len(self.vit.blocks))

    def reconstruct(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        """images: (B, C, H, W) normalised -> (preds, targets, mask, encoder tokens).

        preds/targets: per group (B, h*w, p*p*c_g); mask: (B, G*h*w) bool, True = masked.
        """
        B, _, H, W = images.shape
        p = self.patch_size
        h, w = H // p, W // p
        G = len(self.band_groups) if self.band_groups else 1
        ids_keep, ids_restore, mask = random_masking(B, G * h * w, self.cfg.mask_ratio, images.device, generator)
        tok = forward_tokens(self.vit, images, ids_keep=ids_keep)
        parts = ([tok["cls"].unsqueeze(1)] if self.vit.has_class_token else []) + [tok["reg"], tok["patch"]]
        latent = torch.cat(parts, dim=1)
        preds = self.decoder(latent, ids_restore, (h, w))
        targets = patchify(images, p, self.band_groups)
        return preds, targets, mask, tok

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """batch: ``images`` (B, C, H, W). Returns (scalar loss, float logs)."""
        images = batch["images"]
        preds, targets, mask, tok = self.reconstruct(images)
        stats = None
        if self.cfg.norm_pix_loss and self.cfg.norm_pix_scope == "all_bands" and self.band_groups:
            stats = patch_stats(images, self.patch_size)
        loss = masked_mse(preds, targets, mask, self.cfg.norm_pix_loss, stats)
        vals = torch.stack([loss.detach().float(), mask.float().mean()]).tolist()
        logs = {"loss": vals[0], "mae": vals[0], "mask_ratio": vals[1]}
        logs.update(self.monitor(None, encoder=tok["patch"].mean(dim=1)))
        return loss, logs
