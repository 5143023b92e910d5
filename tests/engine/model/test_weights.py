"""Weight files in every supported layout, written by the tests at tiny size with remapped keys."""
import argparse
import json
import re

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from engine.errors import UserError
from engine.model.explora import apply_explora
from engine.model.tokens import forward_tokens
from engine.model.vit import build_vit, mae_decoder_state
from tests.engine.model.conftest import perturb_trainable, tiny_cfg


def _out(vit, x):
    with torch.no_grad():
        return forward_tokens(vit.eval(), x)["prenorm"]


def test_timm_safetensors_roundtrip_and_no_hub(tiny_weights, images, monkeypatch):
    import timm.models._builder as builder

    def no_hub(*a, **k):
        raise AssertionError("tried to fetch pretrained weights")

    monkeypatch.setattr(builder, "load_pretrained", no_hub)
    path, sd = tiny_weights(seed=3)
    torch.manual_seed(3)
    ref = build_vit(tiny_cfg())
    vit = build_vit(tiny_cfg(weights=path, name="tiny.lvd142m"))
    assert vit.base_info.format == "timm" and vit.base_info.weights_sha256()
    assert torch.equal(_out(vit, images), _out(ref, images))
    pth = path.replace(".safetensors", ".pth")
    torch.save({"state_dict": sd, "head.weight": torch.zeros(3)}, pth)
    assert torch.equal(_out(build_vit(tiny_cfg(weights=pth)), images), _out(ref, images))


def test_dinov2_hub_layout_with_registers(tiny_weights, tmp_path):
    """Official layout: register_tokens, cls position folded out of cls_token, pos_embed on a
    larger grid (like the 37x37 of the released 518px models), a mask token."""
    _, sd = tiny_weights(name="tiny_reg4", img_size=56)  # grid 4x4
    torch.manual_seed(0)
    cls_pos = torch.randn(1, 1, 64)
    off = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    off["register_tokens"] = sd["reg_token"]
    off["cls_token"] = sd["cls_token"] - cls_pos
    off["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    off["mask_token"] = torch.randn(1, 64)
    f = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(off, f)
    vit = build_vit(tiny_cfg(name="tiny_reg4", img_size=28, weights=str(f)))  # grid 2x2
    assert vit.base_info.format == "dinov2_hub"
    torch.testing.assert_close(vit.cls_token, sd["cls_token"])
    torch.testing.assert_close(vit.reg_token, sd["reg_token"])
    torch.testing.assert_close(vit.pos_embed, resample_abs_pos_embed(sd["pos_embed"], [2, 2], [4, 4], num_prefix_tokens=0))
    torch.testing.assert_close(vit.mask_token, off["mask_token"])
    torch.testing.assert_close(vit.blocks[1].ls2.gamma, sd["blocks.1.ls2.gamma"])
    assert forward_tokens(vit, torch.randn(1, 3, 56, 42))["reg"].shape == (1, 4, 64)


def test_dinov2_giant_swiglu_and_training_checkpoint_layout(tmp_path, images):
    """ViT-g's mlp.w12/w3 names, and a DINOv2 training checkpoint: {"teacher": backbone.* with
    chunked blocks.<chunk>.<i>}, heads beside it."""
    torch.manual_seed(0)
    ref = build_vit(tiny_cfg(name="vit_giant_patch14_dinov2", embed_dim=48, depth=2, num_heads=2))
    teacher = {}
    for k, v in ref.state_dict().items():
        k = re.sub(r"mlp\.fc1\.", "mlp.w12.", re.sub(r"mlp\.fc2\.", "mlp.w3.", k))
        k = re.sub(r"^blocks\.(\d+)\.", r"blocks.0.\1.", k)
        teacher["backbone." + k] = v
    teacher["backbone.mask_token"] = torch.zeros(1, 48)
    teacher["dino_head.last_layer.weight"] = torch.zeros(8, 4)
    f = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, f)
    vit = build_vit(tiny_cfg(name="vit_giant_patch14_dinov2", embed_dim=48, depth=2, num_heads=2, weights=str(f)))
    assert torch.equal(_out(vit, images), _out(ref, images))


def test_mae_layout_keeps_decoder(tiny_weights, tmp_path):
    images = torch.randn(2, 3, 64, 48)
    path, sd = tiny_weights(name="tiny_mae", img_size=64)
    dec = {"mask_token": torch.randn(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64),
           "decoder_pos_embed": torch.zeros(1, 10, 32), "decoder_blocks.0.norm1.weight": torch.ones(32),
           "decoder_pred.weight": torch.randn(768, 32)}
    f = tmp_path / "mae_visualize_vit_tiny.pth"
    torch.save({"model": {**sd, **dec}, "args": argparse.Namespace(lr=1e-3), "epoch": 3}, f)
    vit = build_vit(tiny_cfg(name="tiny_mae", img_size=64, weights=str(f)))
    assert vit.base_info.format == "mae" and not hasattr(vit, "mask_token")
    state = mae_decoder_state(vit)
    assert set(state) == set(dec) and torch.equal(state["mask_token"], dec["mask_token"])
    assert torch.equal(_out(vit, images), _out(build_vit(tiny_cfg(name="tiny_mae", img_size=64, weights=path)), images))
    assert mae_decoder_state(build_vit(tiny_cfg(name="tiny_mae", img_size=64, weights=path))) is None


def test_wrong_shapes_and_keys_name_the_file_and_keys(tiny_weights, tmp_path):
    path, sd = tiny_weights()
    with pytest.raises(UserError) as e:
        build_vit(tiny_cfg(weights=path, embed_dim=32))
    msg = str(e.value)
    assert path in msg and "mismatched" in msg and "blocks.0.attn.qkv.weight" in msg and "width 64" in msg
    bad = dict(sd)
    bad.pop("norm.weight")
    bad["extra.thing"] = torch.zeros(2)
    f = tmp_path / "bad.safetensors"
    save_file(bad, str(f))
    with pytest.raises(UserError) as e:
        build_vit(tiny_cfg(weights=str(f)))
    msg = str(e.value)
    assert str(f) in msg and "missing keys [norm.weight]" in msg and "unexpected keys [extra.thing]" in msg
    with pytest.raises(UserError, match="weights-only"):
        torch.save({"model": sd, "opt": _Opaque()}, tmp_path / "pickled.pth")
        build_vit(tiny_cfg(weights=str(tmp_path / "pickled.pth")))


class _Opaque:
    pass


def test_geoexplora_trainer_checkpoint_merges_lora(tiny_weights, tmp_path, images):
    path, _ = tiny_weights()
    vit = build_vit(tiny_cfg(weights=path))
    recipe = dict(unfreeze_blocks=[-1], lora_rank=2, lora_alpha=4.0, lora_targets=["q", "v", "fc2"])
    apply_explora(vit, **recipe)
    perturb_trainable(vit)
    trained = _out(vit, images)
    step = tmp_path / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    module = {"vit." + k: v for k, v in vit.state_dict().items()}
    module["dino_head.mlp.0.weight"] = torch.zeros(4, 64)
    torch.save({"module": module, "global_steps": 10}, step / "mp_rank_00_model_states.pt")
    (step / "meta.json").write_text(json.dumps({"format": "geoexplora-ckpt/1", "step": 10, "complete": True,
                                                "config": {"explora": recipe}}))
    again = build_vit(tiny_cfg(weights=str(step)))
    assert again.base_info.format == "geoexplora"
    assert not any(k.endswith("lora_a") for k in again.state_dict())
    torch.testing.assert_close(_out(again, images), trained, atol=1e-5, rtol=1e-5)


def test_mae_objective_checkpoint_keeps_the_decoder_mask_token(tiny_weights, tmp_path):
    """Our MAE objective saves ``vit.*`` + ``decoder.*`` (official MAE names under ``decoder.``): the
    decoder's mask token comes back as ``mask_token`` beside the ``decoder_*`` tensors."""
    images = torch.randn(2, 3, 64, 48)
    path, sd = tiny_weights(name="tiny_mae", img_size=64)
    dec = {"mask_token": torch.randn(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64),
           "decoder_pos_embed": torch.randn(1, 17, 32), "decoder_norm.weight": torch.ones(32)}
    module = {"vit." + k: v for k, v in sd.items()}
    module.update({"decoder." + k: v for k, v in dec.items()})
    f = tmp_path / "mae_run_consolidated.pth"
    torch.save({"module": module}, f)
    vit = build_vit(tiny_cfg(name="tiny_mae", img_size=64, weights=str(f)))
    assert vit.base_info.format == "mae" and not hasattr(vit, "mask_token")
    state = mae_decoder_state(vit)
    assert set(state) == set(dec)
    assert torch.equal(state["mask_token"], dec["mask_token"])
    assert torch.equal(_out(vit, images), _out(build_vit(tiny_cfg(name="tiny_mae", img_size=64, weights=path)), images))
