"""MAE objective: masking, patch order, masked loss, decoder loading, group-channel shapes, optimisation."""

import numpy as np
import pytest
import torch
from torch import nn

from engine.config import MAEConfig
from engine.errors import UserError
from engine.objectives.mae import MAEObjective, masked_mse, patchify, random_masking
from engine.objectives.mae_decoder import MAEDecoder, sincos_pos_embed_2d
from tests.engine.objectives.conftest import train_steps

CFG = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)


def test_random_masking_per_sample():
    g = torch.Generator().manual_seed(0)
    ids_keep, ids_restore, mask = random_masking(5, 16, 0.75, torch.device("cpu"), g)
    assert ids_keep.shape == (5, 4) and mask.shape == (5, 16)
    assert (mask.sum(dim=1) == 12).all()
    assert not mask.gather(1, ids_keep).any()  # kept tokens are exactly the unmasked ones
    assert len({tuple(r) for r in ids_keep.tolist()}) > 1  # a different pattern per sample
    shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(shuffle[:, :4], ids_keep)


def test_patchify_matches_mae_order():
    x = torch.randn(2, 3, 8, 12)
    (out,) = patchify(x, 4)
    ref = torch.einsum("nchpwq->nhwpqc", x.reshape(2, 3, 2, 4, 3, 4)).reshape(2, 6, 48)
    assert torch.equal(out, ref)
    groups = patchify(x, 4, [[0, 2], [1]])
    assert torch.equal(groups[0], patchify(x[:, [0, 2]], 4)[0])
    assert torch.equal(groups[1], patchify(x[:, [1]], 4)[0])


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_matches_reference_and_respects_mask(norm_pix):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 6, 5, generator=g, requires_grad=True)
    tgt = torch.randn(2, 6, 5, generator=g)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, [1, 4]] = True
    mask[1, [0, 2, 3]] = True
    loss = masked_mse([pred], [tgt], mask, norm_pix)

    ref, n = 0.0, 0
    for b in range(2):
        for j in range(6):
            if mask[b, j]:
                t = tgt[b, j].double()
                if norm_pix:
                    t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6) ** 0.5
                ref += float(((pred[b, j].detach().double() - t) ** 2).mean())
                n += 1
    assert loss.item() == pytest.approx(ref / n, rel=1e-5)

    # unmasked targets do not matter; masked ones do; no gradient reaches unmasked predictions
    tgt2 = tgt.clone()
    tgt2[~mask] = 100.0
    assert masked_mse([pred], [tgt2], mask, norm_pix).item() == pytest.approx(loss.item(), rel=1e-6)
    tgt3 = tgt.clone()
    tgt3[0, 1, 0] += 3.0  # one value (a constant shift would vanish under norm_pix)
    assert masked_mse([pred], [tgt3], mask, norm_pix).item() != pytest.approx(loss.item(), rel=1e-3)
    loss.backward()
    assert pred.grad[~mask].abs().max() == 0 and pred.grad[mask].abs().max() > 0


def test_objective_loss_ignores_visible_patch_targets(tiny_vit):
    torch.manual_seed(0)
    obj = MAEObjective(tiny_vit("mae", img_size=32), MAEConfig(**CFG))
    x = torch.randn(3, 3, 32, 32)
    preds, targets, mask, _ = obj.reconstruct(x, torch.Generator().manual_seed(3))
    assert mask.shape == (3, 4) and (mask.sum(1) == 3).all()
    base = masked_mse(preds, targets, mask, True)
    changed = [t.clone() for t in targets]
    changed[0][~mask] = torch.randn_like(changed[0][~mask])
    assert masked_mse(preds, changed, mask, True).item() == pytest.approx(base.item(), rel=1e-6)


def _mae_sincos_reference(dim, size):
    """MAE's published numpy construction (meshgrid of (w, h); first half encodes grid[0])."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32)), 0)
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0)


def test_sincos_table_matches_mae():
    ours = sincos_pos_embed_2d(16, 3, 3)
    torch.testing.assert_close(ours, torch.from_numpy(_mae_sincos_reference(16, 3)).float())


def test_decoder_loads_official_keys_and_rejects_mismatch(tiny_vit):
    torch.manual_seed(0)
    src = MAEDecoder(64, (2, 2), 16, [3], **CFG)
    state = {
        "model": {
            **{k: v.clone() for k, v in src.state_dict().items()},
            "cls_token": torch.zeros(1, 1, 64),
            "blocks.0.norm1.weight": torch.ones(64),
        }
    }
    torch.manual_seed(1)
    obj = MAEObjective(tiny_vit("mae", img_size=32), MAEConfig(**CFG), decoder_state=state)
    assert obj.decoder_loaded
    for k, v in src.state_dict().items():
        assert torch.equal(obj.decoder.state_dict()[k], v), k
    # decoder_* tensors without the decoder's mask token: loaded, mask token keeps its init
    partial = {k: v for k, v in state["model"].items() if k.startswith("decoder_")}
    obj2 = MAEObjective(tiny_vit("mae", img_size=32), MAEConfig(**CFG), decoder_state=partial)
    assert obj2.decoder_loaded and torch.equal(obj2.decoder.decoder_pred.weight, src.decoder_pred.weight)
    # an encoder-only checkpoint (mae_pretrain_*) leaves the fresh init
    enc_only = MAEObjective(tiny_vit("mae", img_size=32), MAEConfig(**CFG), decoder_state={"cls_token": torch.zeros(1)})
    assert not enc_only.decoder_loaded
    with pytest.raises(UserError, match="decoder_embed_dim"):
        MAEObjective(
            tiny_vit("mae", img_size=32),
            MAEConfig(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=4),
            decoder_state=state,
        )


def test_decoder_pos_embed_from_other_grid_is_resampled(tiny_vit):
    src = MAEDecoder(64, (4, 4), 16, [3], **CFG)
    obj = MAEObjective(tiny_vit("mae", img_size=32), MAEConfig(**CFG), decoder_state=src.state_dict())
    assert obj.decoder.decoder_pos_embed.shape == (1, 5, 32)


class GroupPatchEmbed(nn.Module):
    """Minimal group-channel embed honouring the tokens.py contract: (B, G, h, w, D)."""

    def __init__(self, band_groups, patch, dim, img_size):
        super().__init__()
        self.band_groups = band_groups
        self.num_groups = len(band_groups)
        self.patch_size = (patch, patch)
        self.grid_size = (img_size // patch, img_size // patch)
        self.proj = nn.ModuleList(nn.Conv2d(len(g), dim, patch, patch) for g in band_groups)
        self.group_embed = nn.Parameter(torch.randn(len(band_groups), dim) * 0.02)

    def forward(self, x):
        outs = [
            p(x[:, g]).permute(0, 2, 3, 1) + self.group_embed[i]
            for i, (g, p) in enumerate(zip(self.band_groups, self.proj))
        ]
        return torch.stack(outs, dim=1)


def test_group_channel_mae_shapes_and_backward(tiny_vit):
    torch.manual_seed(0)
    vit = tiny_vit("mae", img_size=32)
    groups = [[0, 1, 2], [3, 4], [5]]
    vit.patch_embed = GroupPatchEmbed(groups, 16, 64, 32)
    obj = MAEObjective(vit, MAEConfig(**CFG))
    x = torch.randn(2, 6, 32, 32)
    preds, targets, mask, _ = obj.reconstruct(x, torch.Generator().manual_seed(0))
    assert mask.shape == (2, 3 * 4) and (mask.sum(1) == 9).all()  # masking over all group tokens
    assert [tuple(p.shape) for p in preds] == [(2, 4, 16 * 16 * 3), (2, 4, 16 * 16 * 2), (2, 4, 16 * 16)]
    assert [p.shape for p in preds] == [t.shape for t in targets]
    assert torch.equal(targets[1], patchify(x[:, [3, 4]], 16)[0])  # each group from its own bands
    loss, logs = obj({"images": x}, step=0)
    loss.backward()
    assert torch.isfinite(loss) and obj.decoder.decoder_group_embed.grad is not None
    assert all(p.grad is not None for p in obj.decoder.decoder_pred.parameters())


def test_optimisation_reduces_the_loss(tiny_vit):
    torch.manual_seed(0)
    obj = MAEObjective(tiny_vit("mae", img_size=32), MAEConfig(**CFG))
    names = {n for n, _ in obj.trainable_parameters()}
    assert any(n.startswith("decoder.") for n in names) and "vit.patch_embed.proj.weight" not in names
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def batch(step: int) -> dict:
        torch.manual_seed(100 + step % 2)  # masks alternate between two draws
        return {"images": x}

    hist = train_steps(obj, batch, steps=8, lr=2e-3)
    first, last = hist[0]["loss"], hist[-1]["loss"]
    assert isinstance(last, float) and hist[-1]["mask_ratio"] == pytest.approx(0.75)
    assert last < 0.95 * first


def _official_decoder_state(dim=64, grid=(2, 2), chans=(3,), seed=0):
    torch.manual_seed(seed)
    src = MAEDecoder(dim, grid, 16, list(chans), **CFG)
    return {"model": {k: v.clone() for k, v in src.state_dict().items()}}, src


def test_decoder_lora_freezes_the_loaded_decoder(tiny_vit):
    """ExPLoRA's --decoder_lora_rank: the loaded decoder trains only LoRA on q,v and its norms."""
    from engine.model.lora import LoRALinear

    state, src = _official_decoder_state()
    obj = MAEObjective(
        tiny_vit("mae", img_size=32), MAEConfig(**CFG, decoder_lora_rank=2, decoder_lora_alpha=1.0), decoder_state=state
    )
    dec = {n: p for n, p in obj.named_parameters() if n.startswith("decoder.")}
    trained = {n for n, p in dec.items() if p.requires_grad}
    assert trained == {
        "decoder.decoder_blocks.0.attn.qkv.lora_a",
        "decoder.decoder_blocks.0.attn.qkv.lora_b",
        "decoder.decoder_blocks.0.norm1.weight",
        "decoder.decoder_blocks.0.norm1.bias",
        "decoder.decoder_blocks.0.norm2.weight",
        "decoder.decoder_blocks.0.norm2.bias",
        "decoder.decoder_norm.weight",
        "decoder.decoder_norm.bias",
    }
    qkv = obj.decoder.decoder_blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and qkv.rank == 2 and qkv.scale == 0.5 and qkv.segments == (0, 64)
    # LoRA B starts at zero: the decoder computes exactly the loaded one
    x = torch.randn(2, 5, 64)
    ids = torch.arange(4).expand(2, 4)
    torch.testing.assert_close(obj.decoder(x, ids, (2, 2)), src(x, ids, (2, 2)))
    # without the decoder norms (explora.train_norms false) only the adapters train
    no_norms = MAEObjective(
        tiny_vit("mae", img_size=32), MAEConfig(**CFG, decoder_lora_rank=2), decoder_state=state, train_norms=False
    )
    assert {n for n, p in no_norms.decoder.named_parameters() if p.requires_grad} == {
        "decoder_blocks.0.attn.qkv.lora_a",
        "decoder_blocks.0.attn.qkv.lora_b",
    }


def test_decoder_from_scratch_trains_fully_and_says_so(tiny_vit, caplog):
    with caplog.at_level("WARNING", logger="engine.objectives.mae"):
        obj = MAEObjective(
            tiny_vit("mae", img_size=32),
            MAEConfig(**CFG, decoder_lora_rank=8),
            decoder_state={"cls_token": torch.zeros(1)},
        )
    assert not obj.decoder_loaded and all(p.requires_grad for p in obj.decoder.parameters())
    assert "starts from scratch" in caplog.text and "decoder_lora_rank is ignored" in caplog.text


def test_group_decoder_loads_an_rgb_decoder_except_its_new_layers(tiny_vit):
    """An official (RGB) decoder onto the group-channel decoder: everything that fits loads; the
    per-group prediction heads and group encoding are new and train (ExPLoRA drops mismatching
    decoder_pred keys)."""
    state, src = _official_decoder_state()
    vit = tiny_vit("mae", img_size=32)
    vit.patch_embed = GroupPatchEmbed([[0, 1, 2], [3, 4], [5]], 16, 64, 32)
    obj = MAEObjective(vit, MAEConfig(**CFG, decoder_lora_rank=2), decoder_state=state)
    assert obj.decoder_loaded
    assert torch.equal(obj.decoder.decoder_embed.weight, src.decoder_embed.weight)
    trained = {n for n, p in obj.decoder.named_parameters() if p.requires_grad}
    assert {"decoder_pred.0.weight", "decoder_pred.2.bias", "decoder_group_embed"} <= trained
    assert "decoder_embed.weight" not in trained and "mask_token" not in trained


def test_decoder_mismatch_names_what_does_not_fit(tiny_vit):
    state, _ = _official_decoder_state()
    with pytest.raises(UserError) as e:
        MAEObjective(
            tiny_vit("mae", img_size=32),
            MAEConfig(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4),
            decoder_state=state,
        )
    msg = str(e.value)
    assert "missing" in msg and "decoder_blocks.1." in msg  # the block the file lacks is named
    assert "width 32 and 1 blocks" in msg and "configured: width 32, 2 blocks" in msg
    with pytest.raises(UserError) as e:
        MAEObjective(
            tiny_vit("mae", img_size=32),
            MAEConfig(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=4),
            decoder_state=state,
        )
    assert "decoder_embed.weight: file (32, 64) vs configured (16, 64)" in str(e.value)


def _satmae_loss(imgs, preds, mask, groups, p):
    """SatMAE's group-channel forward_loss with norm_pix_loss (models_mae_group_channels.py L292-317),
    written from its formula: normalise each spatial patch over ALL bands, per-band MSE averaged
    within each group, masked mean over (group, patch) tokens."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    target = imgs.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = ((target - mean) / (var + 1e-6) ** 0.5).view(B, h * w, C, p * p).permute(0, 2, 1, 3)  # B C L pp
    total, count = 0.0, 0.0
    for gi, g in enumerate(groups):
        # ours predicts (p, p, c) per group; SatMAE (c, p, p): compare in SatMAE's order
        pred = preds[gi].view(B, h * w, p * p, len(g)).permute(0, 3, 1, 2)  # B c L pp
        band_loss = ((pred - target[:, g]) ** 2).mean(-1)  # B c L
        group_loss = band_loss.mean(1)  # B L
        m = mask.view(B, len(groups), h * w)[:, gi].float()
        total += (group_loss * m).sum()
        count += m.sum()
    return total / count


def test_norm_pix_over_all_bands_matches_satmae(tiny_vit):
    from engine.objectives.mae import patch_stats

    torch.manual_seed(0)
    groups = [[0, 1, 2], [3, 4], [5]]
    x = torch.randn(2, 6, 32, 32) * torch.arange(1, 7).view(1, 6, 1, 1)  # bands on different scales
    targets = patchify(x, 16, groups)
    preds = [torch.randn_like(t) for t in targets]
    mask = torch.rand(2, 3 * 4) < 0.6
    ours = masked_mse(preds, targets, mask, True, patch_stats(x, 16))
    torch.testing.assert_close(ours, _satmae_loss(x, preds, mask, groups, 16), rtol=1e-5, atol=1e-6)
    per_group = masked_mse(preds, targets, mask, True)  # the per-group option differs on such data
    assert abs(per_group.item() - ours.item()) > 1e-3
    # the objective picks it from the config
    vit = tiny_vit("mae", img_size=32)
    vit.patch_embed = GroupPatchEmbed(groups, 16, 64, 32)
    obj = MAEObjective(vit, MAEConfig(**CFG, norm_pix_scope="all_bands"))
    torch.manual_seed(5)
    loss, _ = obj({"images": x}, step=0)
    torch.manual_seed(5)
    p_, t_, m_, _ = obj.reconstruct(x)
    torch.testing.assert_close(loss, masked_mse(p_, t_, m_, True, patch_stats(x, 16)))


def _satmae_1d_sincos(dim, positions):
    """SatMAE/MAE get_1d_sincos_pos_embed_from_grid (SatMAE util/pos_embed.py L45-63)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", np.asarray(positions, dtype=np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def test_sincos_group_encoding_matches_satmae():
    from engine.model.patch_embed import GroupChannelPatchEmbed, sincos_group_encoding

    table = sincos_group_encoding(3, 1024, 256)
    assert torch.equal(table[:, :768], torch.zeros(3, 768))
    torch.testing.assert_close(table[:, 768:], torch.from_numpy(_satmae_1d_sincos(256, [0, 1, 2])).float())
    pe = GroupChannelPatchEmbed(32, 16, 10, 1024, encoding="sincos")
    assert "group_embed" not in dict(pe.named_parameters()) and "group_embed" not in pe.state_dict()
    torch.testing.assert_close(pe.group_embed, table)
    # the decoder's: 128 of 512 channels, one more row (index G) for the prefix tokens
    dec = MAEDecoder(1024, (2, 2), 16, [4, 4, 2], 512, 1, 16, group_encoding="sincos")
    torch.testing.assert_close(
        dec.decoder_group_embed[:, 384:], torch.from_numpy(_satmae_1d_sincos(128, [0, 1, 2, 3])).float()
    )
    assert not any("group_embed" in n for n, _ in dec.named_parameters())
