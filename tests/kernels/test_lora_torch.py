"""The fast pure-torch LoRA linear (kernels.lora_torch) against the reference, in float64.

Both draw dropout from torch's generator in the same way, so after the same ``torch.manual_seed``
they apply the same mask: every comparison here, dropout included, is exact up to float64 rounding.
"""

import pytest
import torch

from kernels.lora_torch import lora_linear_torch
from kernels.measure import measure_memory
from kernels.reference import lora_linear_reference

F64 = dict(atol=1e-11, rtol=1e-11)


def _inputs(lead, K, N, r, segments=None, n=None, bias="frozen", w_grad=False, dtype=torch.float64):
    torch.manual_seed(0)
    S = 1 if segments is None else len(segments)
    n = N if n is None else n
    x = torch.randn(*lead, K, dtype=dtype).requires_grad_(True)
    w = (torch.randn(N, K, dtype=dtype) / K**0.5).requires_grad_(w_grad)
    b = None if bias is None else (torch.randn(N, dtype=dtype) * 0.1).requires_grad_(bias == "train")
    a = (torch.randn(S * r, K, dtype=dtype) / K**0.5).requires_grad_(True)
    bb = (torch.randn(S * n, r, dtype=dtype) / r**0.5).requires_grad_(True)
    return x, w, b, a, bb


def _run(fn, tensors, scale, p, segments, dy=None, x_view=None, seed=7):
    """(y, {name: grad}) of ``fn`` with dropout seeded by ``seed``; dy defaults to a fixed random tensor."""
    x, w, b, a, bb = tensors
    xin = x if x_view is None else x_view(x)
    torch.manual_seed(seed)
    y = fn(xin, w, b, a, bb, scale, p, p > 0, segments)
    leaves = {
        k: t for k, t in dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb).items() if t is not None and t.requires_grad
    }
    if dy is None:
        dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    return y, dict(zip(leaves, grads))


def _assert_parity(tensors, scale, p=0.0, segments=None, x_view=None):
    y, grads = _run(lora_linear_torch, tensors, scale, p, segments, x_view=x_view)
    y_ref, grads_ref = _run(lora_linear_reference, tensors, scale, p, segments, x_view=x_view)
    torch.testing.assert_close(y, y_ref, **F64)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], **F64, msg=lambda m, name=name: f"d{name}: {m}")
    return y


@pytest.mark.parametrize(
    "lead, K, N, r, segments, n, bias, w_grad, p, scale",
    [
        ((197,), 100, 75, 3, None, None, "train", False, 0.0, 0.5),  # sizes aligned to nothing
        ((2, 37), 64, 96, 8, (0, 64), 32, "frozen", False, 0.25, 2.0),  # q,v of a fused qkv, dropout
        ((3, 5, 7), 40, 100, 4, (10, 60), 25, None, False, 0.1, 1.5),  # unaligned segments, no bias
        ((33,), 24, 20, 4, None, None, "train", True, 0.3, 0.75),  # base layer trains too
        ((2, 9), 16, 48, 2, (0, 16, 32), 16, "frozen", True, 0.0, 1.0),  # three adjacent segments
    ],
)
def test_outputs_and_every_gradient_match_the_reference(lead, K, N, r, segments, n, bias, w_grad, p, scale):
    tensors = _inputs(lead, K, N, r, segments, n, bias=bias, w_grad=w_grad)
    _assert_parity(tensors, scale, p, segments)


@pytest.mark.parametrize("layout", ["transposed", "strided_last_dim"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_non_contiguous_x(layout, p):
    _, w, b, a, bb = _inputs((1,), 48, 72, 4, (0, 48), 24)
    if layout == "transposed":
        x = torch.randn(48, 70, dtype=torch.float64).requires_grad_(True)
        view = lambda t: t.t()  # noqa: E731 - (70, 48) with strides (1, 70)
    else:
        x = torch.randn(2, 30, 96, dtype=torch.float64).requires_grad_(True)
        view = lambda t: t[..., ::2]  # noqa: E731 - (2, 30, 48), last stride 2
    assert not view(x).is_contiguous()
    _assert_parity((x, w, b, a, bb), 1.0, p, (0, 48), x_view=view)


def test_dropout_is_on_only_in_training_and_follows_the_generator():
    x, w, b, a, bb = _inputs((30,), 32, 16, 4)
    plain = lora_linear_torch(x, w, b, a, bb, 1.0)
    torch.testing.assert_close(lora_linear_torch(x, w, b, a, bb, 1.0, 0.5, training=False), plain, **F64)
    torch.manual_seed(3)
    y1 = lora_linear_torch(x, w, b, a, bb, 1.0, 0.5, training=True)
    torch.manual_seed(3)
    y2 = lora_linear_torch(x, w, b, a, bb, 1.0, 0.5, training=True)
    assert torch.equal(y1, y2) and not torch.allclose(y1, plain)


def test_traces_under_torch_compile_without_graph_breaks():
    """fullgraph=True fails on any graph break; dropout inside the graph keeps the reference's mask."""
    x, w, b, a, bb = _inputs((2, 19), 24, 72, 4, (0, 48), 24)
    fn = torch.compile(lambda *t: lora_linear_torch(*t, 0.5, 0.2, True, (0, 48)), backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    y = fn(x, w, b, a, bb)
    grads = torch.autograd.grad(y.square().sum(), [x, a, bb])
    torch.manual_seed(5)
    y_ref = lora_linear_reference(x, w, b, a, bb, 0.5, 0.2, True, (0, 48))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, a, bb])
    torch.testing.assert_close(y, y_ref, **F64)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, **F64)


def test_autocast_runs_in_the_autocast_dtype():
    x, w, b, a, bb = _inputs((50,), 64, 96, 8, (0, 64), 32, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear_torch(x, w, b, a, bb, 2.0, segments=(0, 64))
        y_ref = lora_linear_reference(x, w, b, a, bb, 2.0, segments=(0, 64))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), atol=3e-2, rtol=2e-2)
    dx, da = torch.autograd.grad(y.float().sum(), [x, a])
    assert dx.dtype == torch.float32 and da.dtype == torch.float32  # back through the casts to the leaves


def test_stride_zero_output_gradient_and_empty_batch():
    x, w, b, a, bb = _inputs((2, 33), 24, 20, 4)
    lora_linear_torch(x, w, b, a, bb, 1.0).sum().backward()  # dy is an expanded (stride-0) tensor
    xr, ar, br = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
    lora_linear_reference(xr, w, b, ar, br, 1.0).sum().backward()
    for g, gr in ((x.grad, xr.grad), (a.grad, ar.grad), (bb.grad, br.grad)):
        torch.testing.assert_close(g, gr, **F64)
    x0, w, b, a, bb = _inputs((0, 5), 16, 12, 2)
    y = lora_linear_torch(x0, w, b, a, bb, 1.0)
    assert y.shape == (0, 5, 12)
    dx, da, db = torch.autograd.grad(y.sum(), [x0, a, bb])
    assert dx.shape == x0.shape and torch.count_nonzero(da) == 0 and torch.count_nonzero(db) == 0


def test_rejects_bad_inputs_with_the_shared_check():
    x, w, b, a, bb = _inputs((8,), 16, 12, 2)
    with pytest.raises(ValueError, match="do not fit"):
        lora_linear_torch(x, w, b, a[:, :8], bb, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear_torch(x, w, b, a, bb, 1.0, 1.0, True)


def test_allocates_a_fraction_of_the_reference_memory():
    """Bytes allocated during fwd+bwd (exact counts from the profiler, not a timing) at a q,v layer:
    no sliced concatenation, no zero-filled slice gradients, no full-size adds."""
    x, w, b, a, bb = _inputs((256,), 128, 384, 16, (0, 256), 128, dtype=torch.float32)
    dy = torch.randn(256, 384)
    figures = {}
    for name, fn in (("torch", lora_linear_torch), ("reference", lora_linear_reference)):

        def step(fn=fn):
            torch.autograd.grad(fn(x, w, b, a, bb, 2.0, 0.0, True, (0, 256)), [x, a, bb], dy)

        step()
        figures[name] = measure_memory(step, "cpu")
    (alloc, peak), (ref_alloc, ref_peak) = figures["torch"], figures["reference"]
    assert 0 < alloc <= ref_alloc / 3, figures
    assert peak <= ref_peak, figures
