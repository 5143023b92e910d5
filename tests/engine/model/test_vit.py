"""build_vit (engine/model/vit.py): dispatch attention, any size and band count, gradient
checkpointing, the meta device."""

import pytest
import torch

from engine.errors import UserError
from engine.model.attention import DispatchAttention
from engine.model.explora import apply_explora
from engine.model.tokens import forward_tokens
from engine.model.vit import build_vit
from tests.engine.model.conftest import tiny_cfg


@pytest.mark.parametrize("name, patch, n_reg", [("tiny", 14, 0), ("tiny_reg4", 14, 4), ("tiny_mae", 16, 0)])
def test_tiny_builds_any_size_and_bands(name, patch, n_reg):
    torch.manual_seed(0)
    vit = build_vit(tiny_cfg(name=name, img_size=2 * patch, in_chans=4))
    assert vit.patch_embed.patch_size[0] == patch and vit.embed_dim == 64 and len(vit.blocks) == 2
    assert all(isinstance(b.attn, DispatchAttention) for b in vit.blocks)
    for h, w in ((2 * patch, 2 * patch), (3 * patch, 2 * patch)):
        out = forward_tokens(vit, torch.randn(1, 4, h, w))
        assert out["patch"].shape == (1, (h // patch) * (w // patch), 64)
        assert out["reg"].shape == (1, n_reg, 64)


def test_grad_checkpointing_flag_gives_same_gradients():
    x = torch.randn(2, 3, 28, 28)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        vit = build_vit(tiny_cfg(img_size=28, grad_checkpointing=ckpt))
        assert vit.grad_checkpointing is ckpt
        apply_explora(vit, lora_rank=2, lora_targets=["q", "v"])
        with torch.no_grad():
            vit.blocks[0].attn.qkv.lora_b.normal_()
        forward_tokens(vit, x)["cls"].square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in vit.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_weight_files_are_checked_where_they_are_read(tmp_path):
    """A config may name files the user does not have yet (presets do): build_vit checks them before
    reading, with the launchers' one-line error; the meta device reads nothing and checks nothing."""
    missing = str(tmp_path / "dinov2_vitl14_pretrain.pth")
    with pytest.raises(
        UserError, match=r"^--model.weights: file '.*dinov2_vitl14_pretrain.pth' not found; give a local"
    ):
        build_vit(tiny_cfg(weights=missing))
    with pytest.raises(UserError, match=r"^--model.adapter: file '.*adapter.safetensors' not found$"):
        build_vit(tiny_cfg(adapter=str(tmp_path / "adapter.safetensors")))
    vit = build_vit(tiny_cfg(weights=missing, adapter=missing), device="meta")
    assert vit.base_info.format == "random" and next(vit.parameters()).is_meta
