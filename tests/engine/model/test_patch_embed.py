import pytest
import torch
from safetensors.torch import save_file

from engine.errors import UserError
from engine.model.explora import apply_explora
from engine.model.patch_embed import S2_DEFAULT_GROUPS, GroupChannelPatchEmbed, adapt_rgb_weight
from engine.model.tokens import embed, forward_tokens, num_groups
from engine.model.vit import build_vit
from tests.engine.model.conftest import tiny_cfg


def test_sentinel2_default_groups():
    # kept bands B2,B3,B4,B5,B6,B7,B8,B8A,B11,B12 -> (B2,B3,B4,B8), (B5,B6,B7,B8A), (B11,B12)
    assert S2_DEFAULT_GROUPS == ((0, 1, 2, 6), (3, 4, 5, 7), (8, 9))
    pe = GroupChannelPatchEmbed(img_size=28, patch_size=14, in_chans=10, embed_dim=32)
    assert pe.num_groups == 3 and [c.in_channels for c in pe.proj] == [4, 4, 2]
    out = pe(torch.randn(2, 10, 42, 28))
    assert out.shape == (2, 3, 3, 2, 32)
    with pytest.raises(ValueError):
        GroupChannelPatchEmbed(img_size=28, patch_size=14, in_chans=7, embed_dim=32)


def test_group_embed_separates_groups():
    pe = GroupChannelPatchEmbed(28, 14, in_chans=4, embed_dim=16, band_groups=[[0, 1], [2, 3]])
    with torch.no_grad():
        pe.proj[1].load_state_dict(pe.proj[0].state_dict())
    x = torch.randn(1, 2, 28, 28).repeat(1, 2, 1, 1)  # both groups see the same two bands
    out = pe(x)
    diff = out[:, 0] - out[:, 1]
    torch.testing.assert_close(diff, (pe.group_embed[0] - pe.group_embed[1]).expand_as(diff))


@pytest.mark.parametrize("mode, chans", [("mean", 10), ("timm", 6)])
def test_adapted_rgb_weights_keep_constant_image_response(mode, chans):
    torch.manual_seed(0)
    w = torch.randn(8, 3, 4, 4)
    w_new = adapt_rgb_weight(w, chans, mode)
    assert w_new.shape == (8, chans, 4, 4)
    # a constant image (same value in every band) gives the RGB model's response
    torch.testing.assert_close(w_new.sum(dim=1), w.sum(dim=1), atol=1e-5, rtol=1e-5)


def test_group_channel_vit_forward_backward_with_masking_and_lora():
    torch.manual_seed(0)
    vit = build_vit(tiny_cfg(img_size=28, in_chans=10, patch_embed="group"))
    assert num_groups(vit) == 3 and vit.patch_embed.fresh
    apply_explora(vit, unfreeze_blocks=[-1], lora_rank=2, lora_targets=["q", "v"])
    assert all(p.requires_grad for p in vit.patch_embed.parameters())
    x = torch.randn(2, 10, 28, 28)
    L = 3 * 2 * 2  # G groups x (28/14)^2 cells, group-major
    tok = forward_tokens(vit, x)
    assert tok["patch"].shape == (2, L, 64) and tok["cls"].shape == (2, 64)
    # MAE-style: keep a random subset of all group tokens
    ids_keep = torch.stack([torch.randperm(L)[:5] for _ in range(2)])
    vis = forward_tokens(vit, x, ids_keep=ids_keep)
    assert vis["patch"].shape == (2, 5, 64)
    full = embed(vit, x)
    torch.testing.assert_close(
        embed(vit, x, ids_keep=ids_keep)[:, 1:], torch.gather(full[:, 1:], 1, ids_keep[..., None].expand(-1, -1, 64))
    )
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, ::3] = True
    masked = forward_tokens(vit, x, mask=mask, mask_token=torch.zeros(64))
    (vis["patch"].square().mean() + masked["cls"].square().mean()).backward()
    for conv in vit.patch_embed.proj:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert vit.patch_embed.group_embed.grad.abs().sum() > 0
    assert vit.blocks[0].attn.qkv.lora_b.grad is not None


def test_group_channel_starts_from_rgb_weights(tiny_weights, tmp_path):
    path, sd = tiny_weights(img_size=28)
    vit = build_vit(tiny_cfg(img_size=28, in_chans=10, patch_embed="group", weights=path))
    w_rgb = sd["patch_embed.proj.weight"]
    for conv, g in zip(vit.patch_embed.proj, S2_DEFAULT_GROUPS):
        torch.testing.assert_close(conv.weight, adapt_rgb_weight(w_rgb, len(g), "timm"))
        torch.testing.assert_close(conv.bias, sd["patch_embed.proj.bias"])
    torch.testing.assert_close(vit.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    with pytest.raises(UserError, match="band_groups"):
        build_vit(tiny_cfg(img_size=28, in_chans=10, patch_embed="group", band_groups=[[0, 11]]))


def test_plain_multispectral_adaptation(tiny_weights):
    path, sd = tiny_weights(img_size=28)
    vit = build_vit(tiny_cfg(img_size=28, in_chans=5, weights=path, patch_embed_adapt="mean"))
    assert vit.patch_embed.proj.weight.shape[1] == 5 and vit.patch_embed.fresh
    torch.testing.assert_close(vit.patch_embed.proj.weight, adapt_rgb_weight(sd["patch_embed.proj.weight"], 5, "mean"))
    apply_explora(vit, lora_rank=2)
    assert vit.patch_embed.proj.weight.requires_grad  # a new (adapted) embed trains
    out = forward_tokens(vit, torch.randn(1, 5, 42, 28))
    assert out["patch"].shape == (1, 6, 64)
    # same band count as the file: loaded as is, stays frozen
    vit3 = build_vit(tiny_cfg(img_size=28, weights=path))
    apply_explora(vit3, lora_rank=2)
    assert not vit3.patch_embed.proj.weight.requires_grad


def test_group_channel_export_reloads_as_trained(tmp_path, tiny_weights):
    path, _ = tiny_weights(img_size=28)
    vit = build_vit(tiny_cfg(img_size=28, in_chans=10, patch_embed="group", weights=path))
    f = tmp_path / "grouped.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(f))
    again = build_vit(tiny_cfg(img_size=28, in_chans=10, patch_embed="group", weights=str(f)))
    assert not again.patch_embed.fresh  # its group convs came from the file
    torch.testing.assert_close(again.patch_embed.group_embed, vit.patch_embed.group_embed)
