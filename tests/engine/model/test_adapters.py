import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from engine.errors import UserError
from engine.model.adapters import (build_from_adapter, export_merged, export_peft, load_adapter, merged_state_dict,
                                   read_adapter, save_adapter)
from engine.model.explora import apply_explora
from engine.model.tokens import forward_tokens
from engine.model.vit import build_vit
from tests.engine.model.conftest import perturb_trainable, tiny_cfg

RECIPE = dict(unfreeze_blocks=[-1], lora_rank=2, lora_alpha=4.0, lora_targets=["q", "v", "fc1"])


def _out(vit, x):
    with torch.no_grad():
        return forward_tokens(vit.eval(), x)["prenorm"]


@pytest.fixture
def trained(tiny_weights):
    """(base weight path, a 3-block model with the recipe applied and its trainable tensors moved)."""
    path, _ = tiny_weights(depth=3)
    vit = build_vit(tiny_cfg(depth=3, weights=path))
    apply_explora(vit, **RECIPE)
    perturb_trainable(vit)
    return path, vit


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
    assert torch.equal(_out(fresh, images), _out(vit, images))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(tensors)
    rebuilt = build_from_adapter(f)
    assert torch.equal(_out(rebuilt, images), _out(vit, images))


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


def test_merged_state_dict_loads_into_plain_timm(trained, tmp_path, images):
    path, vit = trained
    sd = merged_state_dict(vit)
    plain = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, dynamic_img_size=True,
                              num_classes=0, embed_dim=64, depth=3, num_heads=2)
    plain.load_state_dict(sd, strict=True)
    plain.eval()
    with torch.no_grad():
        ref = plain.forward_features(images)
    torch.testing.assert_close(ref, vit.norm(_out(vit, images)), atol=1e-5, rtol=1e-5)
    f = export_merged(vit, tmp_path / "merged.safetensors")
    assert set(load_file(str(f))) == set(sd)
    # the merged file is a base of its own, and --model.adapter merges at build time
    merged = build_vit(tiny_cfg(depth=3, weights=str(f)))
    torch.testing.assert_close(_out(merged, images), _out(vit, images), atol=1e-5, rtol=1e-5)
    a = save_adapter(vit, tmp_path / "adapter.safetensors")
    via_cfg = build_vit(tiny_cfg(depth=3, weights=path, adapter=str(a)))
    torch.testing.assert_close(_out(via_cfg, images), _out(vit, images), atol=1e-5, rtol=1e-5)


def test_peft_layout_reproduces_the_merged_weights(tiny_weights, tmp_path):
    """Apply the exported files with PEFT's rules (W + lora_alpha/r * B A per target module, rank and
    alpha from rank_pattern/alpha_pattern, modules_to_save copied) and compare to the merge.
    PEFT has no place for root tensors, so this recipe keeps the cls token frozen."""
    path, _ = tiny_weights(depth=3)
    vit = build_vit(tiny_cfg(depth=3, weights=path))
    apply_explora(vit, **RECIPE, train_tokens=False)
    perturb_trainable(vit)
    out = export_peft(vit, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"] == {"qkv": 4} and cfg["alpha_pattern"] == {"qkv": 8.0}
    assert "blocks.2" in cfg["modules_to_save"] and "norm" in cfg["modules_to_save"]
    base = load_file(path)
    rebuilt = dict(base)
    pre = "base_model.model."
    for name in cfg["target_modules"]:
        leaf = name.rsplit(".", 1)[-1]
        r = cfg["rank_pattern"].get(leaf, cfg["r"])
        alpha = cfg["alpha_pattern"].get(leaf, cfg["lora_alpha"])
        a, b = tensors[f"{pre}{name}.lora_A.weight"], tensors[f"{pre}{name}.lora_B.weight"]
        assert a.shape[0] == r == b.shape[1]
        rebuilt[f"{name}.weight"] = base[f"{name}.weight"] + alpha / r * (b @ a)
    for k, v in tensors.items():
        if ".lora_" not in k:
            rebuilt[k[len(pre):]] = v
    merged = merged_state_dict(vit)
    assert set(rebuilt) == set(merged)
    for k in merged:
        torch.testing.assert_close(rebuilt[k], merged[k], atol=1e-6, rtol=1e-5, msg=k)


def test_peft_refuses_unmappable_tensors(tiny_weights, tmp_path):
    path, _ = tiny_weights()
    vit = build_vit(tiny_cfg(weights=path))
    apply_explora(vit, lora_rank=2, train_pos_embed=True)
    with pytest.raises(UserError, match="pos_embed"):
        export_peft(vit, tmp_path / "peft")
    vit = build_vit(tiny_cfg(weights=path))
    apply_explora(vit, lora_rank=2)  # the default recipe trains the cls token
    with pytest.raises(UserError, match="cls_token"):
        export_peft(vit, tmp_path / "peft")


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
