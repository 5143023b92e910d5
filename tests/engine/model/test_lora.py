import pytest
import torch
from torch import nn

from engine.model.lora import LoRALinear, lora_modules, mark_only_lora_as_trainable, merge_lora_weights, unwrap_lora


def _linear(k=16, n=24, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("segments, width", [(None, None), ((0, 16), 8), ((0, 8, 16), 8)])
def test_init_equals_base_exactly(segments, width):
    base = _linear()
    ref = _linear()  # same seed: same weights, separate Parameters
    m = LoRALinear(base, rank=4, alpha=8, segments=segments, segment_width=width)
    assert m.weight is base.weight and m.bias is base.bias  # shared, not copied
    assert torch.count_nonzero(m.lora_a) > 0 and torch.count_nonzero(m.lora_b) == 0
    x = torch.randn(3, 5, 16)
    assert torch.equal(m(x), ref(x))


def test_segments_equal_separate_q_and_v_adapters():
    dim, r = 8, 2
    base = _linear(k=dim, n=3 * dim)
    m = LoRALinear(base, rank=r, alpha=4, segments=(0, 2 * dim), segment_width=dim)
    with torch.no_grad():
        m.lora_b.normal_()
    x = torch.randn(4, dim)
    a_q, a_v = m.lora_a[:r], m.lora_a[r:]
    b_q, b_v = m.lora_b[:dim], m.lora_b[dim:]
    expect = base(x).detach().clone()
    expect[:, :dim] += m.scale * (x @ a_q.T @ b_q.T)
    expect[:, 2 * dim :] += m.scale * (x @ a_v.T @ b_v.T)
    torch.testing.assert_close(m(x), expect)


@pytest.mark.parametrize("segments, width", [(None, None), ((0, 16), 8)])
def test_merge_unmerge_equal_lora_forward(segments, width):
    m = LoRALinear(_linear(), rank=4, alpha=8, segments=segments, segment_width=width)
    with torch.no_grad():
        m.lora_b.normal_(std=0.5)
    w0 = m.weight.detach().clone()
    x = torch.randn(6, 16)
    y = m(x)
    m.merge()
    assert m.merged
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    m.unmerge()
    torch.testing.assert_close(m.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_adapter():
    m = LoRALinear(_linear(), rank=4, alpha=4)
    with torch.no_grad():
        m.lora_b.normal_()
    m(torch.randn(5, 16)).square().sum().backward()
    assert m.weight.grad is None and m.bias.grad is None
    assert m.lora_a.grad is not None and m.lora_b.grad is not None


def test_dropout_only_in_training():
    m = LoRALinear(_linear(), rank=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        m.lora_b.normal_()
    x = torch.randn(64, 16)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    y1 = m(x)
    torch.manual_seed(1)
    assert not torch.allclose(y1, m(x))


def test_bad_segments_rejected():
    with pytest.raises(ValueError):
        LoRALinear(_linear(), rank=2, alpha=2, segments=(0, 4), segment_width=8)  # overlap
    with pytest.raises(ValueError):
        LoRALinear(_linear(), rank=2, alpha=2, segments=(20,), segment_width=8)  # past the end


def test_module_helpers_and_unwrap():
    seq = nn.Sequential(_linear(), nn.ReLU(), _linear(k=24, n=16, seed=1))
    seq[0] = LoRALinear(seq[0], rank=2, alpha=2)
    seq[2] = LoRALinear(seq[2], rank=2, alpha=2, segments=(8,), segment_width=8)
    for _, m in lora_modules(seq):
        with torch.no_grad():
            m.lora_b.normal_()
    mark_only_lora_as_trainable(seq)
    assert {n for n, p in seq.named_parameters() if p.requires_grad} == {"0.lora_a", "0.lora_b", "2.lora_a", "2.lora_b"}
    x = torch.randn(3, 16)
    y = seq(x)
    assert unwrap_lora(seq) == 2
    assert not list(lora_modules(seq)) and type(seq[0]) is nn.Linear
    assert set(seq.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    torch.testing.assert_close(seq(x), y, atol=1e-5, rtol=1e-5)
    merge_lora_weights(seq)  # no LoRA left: harmless


def test_compiles_without_graph_breaks():
    """The reference path traces into one graph (fullgraph=True) with LoRA in every block."""
    from engine.config import ModelConfig
    from engine.model.explora import apply_explora
    from engine.model.tokens import forward_tokens
    from engine.model.vit import build_vit

    torch.manual_seed(0)
    vit = build_vit(ModelConfig(name="tiny", img_size=28, depth=1))
    apply_explora(vit, unfreeze_blocks=[], lora_rank=2, lora_alpha=2, lora_targets=["q", "v", "proj", "fc2"])
    x = torch.randn(2, 3, 28, 28)

    def f(inp):
        return forward_tokens(vit, inp)["cls"]

    # kernels.dispatch logs the backend once per (op, device) on its first call; log calls break
    # dynamo graphs, so the first (eager) call happens outside the compiled region.
    ref = f(x)
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(out, ref)
