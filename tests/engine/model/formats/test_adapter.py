"""geoexplora adapter files (engine/model/formats/adapter.py): exact round trip onto a fresh base,
refusal of another base, group-channel models; build_from_adapter (engine/model/vit.py)."""

import pytest
import torch

from engine.errors import UserError
from engine.model.explora import apply_explora
from engine.model.formats.adapter import load_adapter, read_adapter, save_adapter
from engine.model.formats.peft_export import export_peft
from engine.model.vit import build_from_adapter, build_vit
from tests.engine.model.conftest import perturb_trainable, prenorm, tiny_cfg
from tests.engine.model.formats.conftest import RECIPE


def test_adapter_roundtrip_onto_fresh_base_is_exact(trained, tmp_path, images):
    path, vit = trained
    f = save_adapter(vit, tmp_path / "adapter.safetensors")
    tensors, meta = read_adapter(f)
    assert set(tensors) == {n for n, p in vit.named_parameters() if p.requires_grad}
    assert not any(k.endswith("attn.qkv.weight") and not k.startswith("blocks.2.") for k in tensors)
    assert meta["base"]["weights_sha256"] == vit.base_info.weights_sha256()
    assert meta["recipe"]["unfrozen_block_indices"] == [2]
    fresh = build_vit(tiny_cfg(depth=3, weights=path))
    load_adapter(fresh, f)
    assert torch.equal(prenorm(fresh, images), prenorm(vit, images))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(tensors)
    rebuilt = build_from_adapter(f)
    assert torch.equal(prenorm(rebuilt, images), prenorm(vit, images))


def test_adapter_refuses_another_base(trained, tiny_weights, tmp_path):
    _, vit = trained
    f = save_adapter(vit, tmp_path / "adapter.safetensors")
    other, _ = tiny_weights(seed=7, depth=3)
    with pytest.raises(UserError, match="trained on base weights"):
        load_adapter(build_vit(tiny_cfg(depth=3, weights=other)), f)
    with pytest.raises(UserError, match="not a geoexplora adapter"):
        load_adapter(build_vit(tiny_cfg(depth=3)), other)
    with pytest.raises(UserError, match="ExPLoRA adapter, not base weights"):
        build_vit(tiny_cfg(depth=3, weights=str(f)))


def test_group_channel_adapter_roundtrip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(img_size=28, in_chans=10, patch_embed="group")
    vit = build_vit(cfg)
    apply_explora(vit, **RECIPE)
    perturb_trainable(vit)
    f = save_adapter(vit, tmp_path / "group.safetensors")
    assert "patch_embed.group_embed" in read_adapter(f)[0]
    torch.manual_seed(5)  # a different random base: refused by default (the frozen tensors differ) ...
    other = build_vit(cfg)
    with pytest.raises(UserError, match="random-init base"):
        load_adapter(other, f)
    load_adapter(other, f, check_base=False)  # ... but the file's own tensors all load
    trained_tensors = {n: p for n, p in vit.named_parameters() if p.requires_grad}
    for n, p in other.named_parameters():
        assert p.requires_grad == (n in trained_tensors)
        if p.requires_grad:
            assert torch.equal(p, trained_tensors[n]), n
    with pytest.raises(UserError, match="group-channel"):
        export_peft(vit, tmp_path / "peft")
