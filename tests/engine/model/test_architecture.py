"""The architectures (engine/model/architecture.py): names, shape overrides and their errors, drop
path, the token assembly; built through build_vit as users build them."""

import pytest
import torch

from engine.errors import UserError
from engine.model.architecture import resolve_arch, set_drop_path
from engine.model.tokens import TokenAssembly, forward_tokens
from engine.model.vit import build_vit
from tests.engine.model.conftest import plain_dinov2, tiny_cfg


def test_overrides_and_names():
    assert resolve_arch("vit_large_patch16_224.mae") == ("vit_large_patch16_224", {})
    vit = build_vit(tiny_cfg(name="tiny", depth=3, embed_dim=32, num_heads=4), device="meta")
    assert len(vit.blocks) == 3 and vit.embed_dim == 32
    with pytest.raises(UserError, match="unknown architecture"):
        build_vit(tiny_cfg(name="resnet50"))
    with pytest.raises(UserError, match="not divisible"):
        build_vit(tiny_cfg(embed_dim=30, num_heads=4))
    with pytest.raises(UserError, match="multiple of"):
        build_vit(tiny_cfg(img_size=50))


def test_drop_path_uniform_like_dinov2_and_off_in_eval(images):
    from timm.layers import DropPath

    vit = build_vit(tiny_cfg(depth=3, drop_path_rate=0.4))
    rates = [b.drop_path1.drop_prob for b in vit.blocks] + [b.drop_path2.drop_prob for b in vit.blocks]
    assert rates == [0.4] * 6  # DINOv2's drop_path_uniform
    assert set_drop_path(vit, 0.4, uniform=False) == pytest.approx([0.0, 0.2, 0.4])
    assert not isinstance(vit.blocks[0].drop_path1, DropPath) and vit.blocks[2].drop_path2.drop_prob == 0.4
    set_drop_path(vit, 0.4)
    vit.train()
    torch.manual_seed(0)
    a = forward_tokens(vit, images)["cls"]
    b = forward_tokens(vit, images)["cls"]
    assert not torch.equal(a, b)  # the student drops paths
    vit.eval()  # the EMA teacher runs in eval mode: deterministic
    assert torch.equal(forward_tokens(vit, images)["cls"], forward_tokens(vit, images)["cls"])
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in build_vit(tiny_cfg(depth=3)).blocks)


def test_token_assembly_is_a_parameter_free_submodule(images):
    """The ViT's own tensors are read inside vit.token_assembly (a module, so ZeRO-3 gathers and
    releases them around it); it adds no state-dict keys and changes no output."""

    torch.manual_seed(0)
    vit = build_vit(tiny_cfg()).eval()
    assert isinstance(vit.token_assembly, TokenAssembly)
    assert not any("token_assembly" in k for k in vit.state_dict())
    plain = plain_dinov2(num_classes=0).eval()
    plain.load_state_dict(vit.state_dict())
    torch.testing.assert_close(forward_tokens(vit, images)["patch"], forward_tokens(plain, images)["patch"])
