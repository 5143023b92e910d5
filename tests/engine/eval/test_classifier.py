"""The fine-tuning model: which tensors train in each mode, layer-wise lr decay, losses."""

import pytest
import torch

from engine.config import load_config
from engine.eval.classifier import build_classifier
from engine.eval.config import FinetuneRunConfig
from engine.trainer.deepspeed_setup import param_groups


def _cfg(*over):
    return load_config(
        FinetuneRunConfig, None, ["--model.name", "tiny", "--model.img_size", "28", "--model.depth", "3", *over]
    )


def test_lora_mode_trains_only_lora_and_head():
    model, report = build_classifier(_cfg("--finetune.lora_rank", "4"), num_classes=5)
    names = [n for n, _ in model.trainable_parameters()]
    assert names and all("lora_" in n or n.startswith("head.") for n in names)
    assert {"head.weight", "head.bias"} <= set(names)
    # LoRA on q,v of all 3 blocks: A (2r x D) + B (2 segments of D x r) per block
    d = model.vit.embed_dim
    assert report.trainable == 3 * (2 * 4 * d + 2 * d * 4)


def test_full_mode_trains_the_backbone():
    model, _ = build_classifier(_cfg("--finetune.mode", "full"), num_classes=3)
    trainable = {n for n, _ in model.trainable_parameters()}
    assert "vit.blocks.0.attn.qkv.weight" in trainable and "vit.patch_embed.proj.weight" in trainable
    assert not any("lora_" in n for n in trainable)


def test_layer_decay_multipliers_and_groups():
    model, _ = build_classifier(_cfg("--finetune.mode", "full", "--finetune.layer_decay", "0.5"), num_classes=3)
    m = model.lr_multiplier
    assert m("head.weight") == 1.0 and m("vit.norm.weight") == 1.0
    assert m("vit.blocks.2.mlp.fc1.weight") == 0.5
    assert m("vit.blocks.0.attn.qkv.weight") == 0.5**3
    assert m("vit.patch_embed.proj.weight") == m("vit.cls_token") == 0.5**4
    groups = param_groups(model.trainable_parameters(), lr_mult=m)
    mults = sorted({g["lr_mult"] for g in groups})
    assert mults == [0.5**4, 0.5**3, 0.5**2, 0.5, 1.0]
    assert all(g["wd_mult"] == 0.0 for g in groups if g["group"].startswith("no_decay"))
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.trainable_parameters()))


@pytest.mark.parametrize("over", [[], ["--finetune.mixup", "0.8", "--finetune.cutmix", "1.0"]])
def test_loss_backward_reaches_trainables(over):
    torch.manual_seed(0)
    model, _ = build_classifier(_cfg(*over), num_classes=4)
    batch = {"images": torch.randn(4, 3, 28, 28), "labels": torch.tensor([0, 1, 2, 3])}
    loss, logs = model(batch, 0)
    assert torch.isfinite(loss) and "ce" in logs
    loss.backward()
    grads = [p.grad for _, p in model.trainable_parameters()]
    assert all(g is not None for g in grads)
    assert model.head.weight.grad.abs().sum() > 0


def test_multilabel_loss():
    model, _ = build_classifier(_cfg(), num_classes=4, multilabel=True)
    batch = {"images": torch.randn(2, 3, 28, 28), "labels": torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])}
    loss, logs = model(batch, 0)
    assert torch.isfinite(loss) and "bce" in logs


def test_bad_finetune_options_name_the_flag():
    from engine.errors import UserError

    with pytest.raises(UserError, match="--finetune.lora_targets"):
        _cfg("--finetune.lora_targets", "q,x")
    with pytest.raises(UserError, match="--finetune.layer_decay"):
        _cfg("--finetune.layer_decay", "0")


@pytest.mark.parametrize("name", ["finetune_tiny_cpu.yaml", "finetune_vitl14_fmow_rgb.yaml"])
def test_finetune_presets_load(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "engine" / "presets" / name
    cfg = load_config(FinetuneRunConfig, str(path), [])
    assert cfg.finetune.mode == "lora" and cfg.finetune.lora_targets == ["q", "v"]
    if name.startswith("finetune_tiny"):
        model, report = build_classifier(cfg, num_classes=4)
        assert 0 < report.trainable < report.frozen
