"""The objectives on engine/model's real pieces: build_vit, apply_explora (LoRA), group-channel embed."""

import pytest
import torch

from engine.config import DinoConfig, ExploraConfig, MAEConfig, ModelConfig
from engine.model.explora import apply_explora
from engine.model.lora import LoRALinear
from engine.model.tokens import forward_tokens
from engine.model.vit import build_vit
from engine.objectives import DinoObjective, MAEObjective
from engine.objectives.teacher import eval_mode
from tests.engine.objectives.conftest import ClsToken, train_steps

B = 2
HEAD = dict(head_n_prototypes=32, head_hidden_dim=16, head_bottleneck_dim=8)


def _explora_vit(**model_kw):
    torch.manual_seed(0)
    vit = build_vit(ModelConfig(name="tiny", **model_kw))
    report = apply_explora(vit, ExploraConfig(lora_rank=4, lora_alpha=4.0, lora_targets=["q", "v", "fc1"]))
    return vit, report


def _dino_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "global_crops": torch.randn(2 * B, 3, 28, 28, generator=g),
        "local_crops": torch.randn(2 * B, 3, 14, 14, generator=g),
        "masks": torch.rand(2 * B, 4, generator=g) < 0.5,
    }


def test_teacher_tracks_lora_and_shares_the_frozen_base():
    vit, report = _explora_vit(img_size=28)
    obj = DinoObjective(vit, DinoConfig(**HEAD, momentum_teacher=0.5, final_momentum_teacher=0.5), total_steps=10)
    opt = torch.optim.SGD([p for _, p in obj.trainable_parameters()], lr=0.5)
    loss, _ = obj(_dino_batch(0), step=0)
    loss.backward()
    opt.step()
    obj.on_step_end(0)

    t = obj.teacher
    vit_names = {n for n in t.names if n.startswith("vit.")}
    assert vit_names == {f"vit.{n}" for n, p in vit.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_a") for n in vit_names) and any(n.endswith("lora_b") for n in vit_names)
    assert sum(e.numel() for n, e in zip(t.names, t.ema) if n.startswith("vit.")) == report.trainable
    lora = vit.blocks[0].attn.qkv
    assert isinstance(lora, LoRALinear)
    ema_b = t.ema[t.names.index("vit.blocks.0.attn.qkv.lora_b")]
    # B starts at zero; after one step the student's B moved and the EMA went half way
    assert lora.lora_b.abs().sum() > 0
    torch.testing.assert_close(ema_b, 0.5 * lora.lora_b.detach())
    base_ptr = lora.weight.data_ptr()
    x = torch.randn(2, 3, 28, 28)
    with t.teacher_mode():
        assert lora.weight.data_ptr() == base_ptr  # the frozen base weight is shared, not copied
        assert torch.equal(lora.lora_b, ema_b)
        got = forward_tokens(vit, x)["cls"]
    ema_vit = {n: e for n, e in zip(t.names, t.ema) if n.startswith("vit.")}
    with torch.no_grad(), eval_mode([vit]):
        ref = torch.func.functional_call(ClsToken(vit), ema_vit, (x,))
    torch.testing.assert_close(got, ref)


def test_merged_lora_is_refused_by_the_teacher():
    vit, _ = _explora_vit(img_size=28)
    obj = DinoObjective(vit, DinoConfig(**HEAD), total_steps=10)
    vit.blocks[0].attn.qkv.merge()
    with pytest.raises(RuntimeError, match="merged"):
        obj(_dino_batch(1), step=0)


def test_dino_with_explora_reduces_the_loss():
    vit, _ = _explora_vit(img_size=28)
    obj = DinoObjective(vit, DinoConfig(**HEAD, momentum_teacher=0.9), total_steps=100)
    hist = [logs["loss"] for logs in train_steps(obj, _dino_batch(2), steps=6, lr=3e-3)]
    assert hist[-1] < 0.9 * hist[0], hist


def test_mae_on_the_group_channel_embed():
    groups = [[0, 1, 2], [3, 4], [5]]
    vit, _ = _explora_vit(img_size=28, patch_embed="group", in_chans=6, band_groups=groups)
    assert vit.patch_embed.num_groups == 3
    obj = MAEObjective(vit, MAEConfig(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2))
    assert obj.band_groups == groups  # read from vit.patch_embed.band_groups
    x = torch.randn(2, 6, 28, 28)
    preds, targets, mask, _ = obj.reconstruct(x, torch.Generator().manual_seed(0))
    assert mask.shape == (2, 3 * 4) and (mask.sum(1) == 9).all()
    assert [tuple(p.shape) for p in preds] == [(2, 4, 14 * 14 * c) for c in (3, 2, 1)]
    loss, _ = obj({"images": x}, step=0)
    loss.backward()
    assert vit.patch_embed.proj[0].weight.grad is not None  # a fresh group embed trains
