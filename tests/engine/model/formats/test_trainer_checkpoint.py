"""A geoexplora trainer checkpoint directory as base weights (engine/model/formats/trainer_checkpoint.py):
the ViT under ``vit.``, its LoRA merged with the recipe of meta.json."""

import json

import torch

from engine.model.explora import apply_explora
from engine.model.vit import build_vit
from tests.engine.model.conftest import perturb_trainable, prenorm, tiny_cfg


def test_geoexplora_trainer_checkpoint_merges_lora(tiny_weights, tmp_path, images):
    path, _ = tiny_weights()
    vit = build_vit(tiny_cfg(weights=path))
    recipe = dict(unfreeze_blocks=[-1], lora_rank=2, lora_alpha=4.0, lora_targets=["q", "v", "fc2"])
    apply_explora(vit, **recipe)
    perturb_trainable(vit)
    trained = prenorm(vit, images)
    step = tmp_path / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    module = {"vit." + k: v for k, v in vit.state_dict().items()}
    module["dino_head.mlp.0.weight"] = torch.zeros(4, 64)
    torch.save({"module": module, "global_steps": 10}, step / "mp_rank_00_model_states.pt")
    (step / "meta.json").write_text(
        json.dumps({"format": "geoexplora-ckpt/1", "step": 10, "complete": True, "config": {"explora": recipe}})
    )
    again = build_vit(tiny_cfg(weights=str(step)))
    assert again.base_info.format == "geoexplora"
    assert not any(k.endswith("lora_a") for k in again.state_dict())
    torch.testing.assert_close(prenorm(again, images), trained, atol=1e-5, rtol=1e-5)
