"""DispatchAttention inside a tiny timm ViT: same state dict, same outputs and gradients as timm."""

import copy

import pytest
import timm
import torch
from timm.layers.attention import Attention
from torch import nn

from engine.model.attention import DispatchAttention, use_dispatch_attention
from kernels import dispatch


def _tiny_vit(**kw):
    # 32 px / patch 8 -> 16 patches + cls = 17 tokens: not a multiple of any kernel block.
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0, dynamic_img_size=True)
    args.update(kw)
    return timm.create_model("vit_base_patch16_224", pretrained=False, **args)


@pytest.fixture
def backend(monkeypatch):
    """Select an attention backend for one test (env wins over config, so clear it first)."""
    monkeypatch.delenv("GEOEXPLORA_ATTENTION", raising=False)
    monkeypatch.delenv("GEOEXPLORA_KERNELS", raising=False)
    saved = dict(dispatch._configured)
    yield lambda name: dispatch.set_backend("attention", name)
    dispatch._configured.update(saved)


def _outputs_and_grads(model, x):
    x = x.clone().requires_grad_(True)
    out = model.forward_features(x)
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), x.grad.clone(), grads


def _assert_matches_timm(ref, x, tol: float, grad_rtol: float):
    """A deep copy of timm ViT ``ref`` with DispatchAttention gives ref's features, input gradient
    and every parameter gradient (atol ``tol``; rtol ``tol``, ``grad_rtol`` for parameters)."""
    ours = copy.deepcopy(ref)
    use_dispatch_attention(ours)
    o_ref, gx_ref, g_ref = _outputs_and_grads(ref, x)
    o, gx, g = _outputs_and_grads(ours, x)
    torch.testing.assert_close(o, o_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gx, gx_ref, atol=tol, rtol=tol)
    assert g.keys() == g_ref.keys()
    for key in g_ref:
        torch.testing.assert_close(g[key], g_ref[key], atol=tol, rtol=grad_rtol, msg=key)


def test_swap_keeps_state_dict_and_counts():
    vit = _tiny_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    params_before = dict(vit.named_parameters())
    assert use_dispatch_attention(vit) == 2
    assert all(isinstance(b.attn, DispatchAttention) for b in vit.blocks)
    assert not any(isinstance(m, Attention) for m in vit.modules())
    after = vit.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert after[key].shape == before[key].shape
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    # the same Parameter objects: optimizer state and requires_grad flags carry over
    assert all(p is params_before[n] for n, p in vit.named_parameters())
    assert use_dispatch_attention(vit) == 0
    # a timm checkpoint loads strictly into the swapped model
    vit.load_state_dict(before, strict=True)


@pytest.mark.parametrize("name", ["reference", "sdpa"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_outputs_and_grads_match_timm(backend, name, qk_norm):
    backend(name)
    _assert_matches_timm(_tiny_vit(qk_norm=qk_norm), torch.randn(2, 3, 32, 32), tol=1e-5, grad_rtol=1e-4)


def test_triton_backend_in_vit_matches_timm(backend):
    """The Triton kernel (interpreted on CPU) as a ViT's attention: 17 tokens, head dim 16."""
    backend("triton")
    _assert_matches_timm(_tiny_vit(depth=1), torch.randn(1, 3, 32, 32), tol=1e-4, grad_rtol=1e-3)


def test_attention_dropout_in_training_uses_sdpa_dropout(backend, monkeypatch):
    backend("reference")
    ref = _tiny_vit(attn_drop_rate=0.3).train()
    ours = copy.deepcopy(ref)
    use_dispatch_attention(ours)
    calls = []
    real = dispatch.attention
    monkeypatch.setattr(dispatch, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    o_ref = ref.forward_features(x)
    torch.manual_seed(1)
    o = ours.forward_features(x)
    assert calls == []  # dropout is not something the dispatch backends apply
    # timm's fused path draws the same dropout mask from SDPA with the same seed
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    ours.eval()
    ours.forward_features(x)
    assert len(calls) == 2  # eval: dropout off, both blocks go through dispatch


def test_attn_mask_is_honoured(backend):
    backend("reference")
    ref = _tiny_vit(depth=1)
    ours = copy.deepcopy(ref)
    use_dispatch_attention(ours)
    x = torch.randn(2, 17, 64)
    mask = torch.ones(2, 1, 17, 17, dtype=torch.bool)
    mask[..., 12:] = False
    torch.testing.assert_close(
        ours.blocks[0].attn(x, attn_mask=mask), ref.blocks[0].attn(x, attn_mask=mask), atol=1e-5, rtol=1e-5
    )


class _CountingWrapper(nn.Module):
    """Stands in for a LoRA wrapper: holds the base linear, adds a learned delta, counts calls."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.delta = nn.Parameter(torch.full((base.out_features,), 0.5))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.base(x) + self.delta


def test_qkv_wrapped_after_swap_is_called_as_module(backend):
    backend("reference")
    vit = _tiny_vit()
    use_dispatch_attention(vit)
    x = torch.randn(1, 3, 32, 32)
    plain = vit.forward_features(x).detach()
    for block in vit.blocks:
        block.attn.qkv = _CountingWrapper(block.attn.qkv)
    wrapped = vit.forward_features(x)
    assert [b.attn.qkv.calls for b in vit.blocks] == [1, 1]
    assert not torch.allclose(wrapped, plain)
    wrapped.sum().backward()
    assert all(b.attn.qkv.delta.grad is not None for b in vit.blocks)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "sdpa"])
def test_gpu_bf16_vit_matches_timm_and_compiles(backend, name):
    """ViT-B-like block widths (head dim 64, 197 tokens) in bf16 on CUDA, eager and torch.compile."""
    backend(name)
    ref = _tiny_vit(img_size=224, patch_size=16, embed_dim=256, num_heads=4).cuda().to(torch.bfloat16)
    ours = copy.deepcopy(ref)
    use_dispatch_attention(ours)
    x = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    o_ref, gx_ref, _ = _outputs_and_grads(ref, x)
    o, gx, _ = _outputs_and_grads(ours, x)
    torch.testing.assert_close(o, o_ref, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(gx, gx_ref, atol=5e-2, rtol=5e-2)
    compiled = torch.compile(ours.forward_features)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), o, atol=5e-2, rtol=5e-2)
