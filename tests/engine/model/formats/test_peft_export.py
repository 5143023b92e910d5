"""The PEFT layout (engine/model/formats/peft_export.py) reproduces the merged weights under PEFT's
rules and refuses what PEFT cannot hold."""

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import UserError
from engine.model.explora import apply_explora
from engine.model.formats.merged import merged_state_dict
from engine.model.formats.peft_export import export_peft
from engine.model.vit import build_vit
from tests.engine.model.conftest import perturb_trainable, tiny_cfg
from tests.engine.model.formats.conftest import RECIPE


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
            rebuilt[k[len(pre) :]] = v
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
