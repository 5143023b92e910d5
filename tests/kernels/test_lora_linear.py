"""Parity of the fused Triton LoRA linear (interpreted on CPU, compiled on GPU) with the reference.

Ground truth is ``kernels.reference.lora_linear_reference`` in float64 on the same (rounded) inputs,
with the kernel's own dropout mask passed explicitly, so dropout cases compare exactly too.
"""

import pytest
import torch
import torch.nn.functional as F
import triton

import kernels.lora_linear as lora_kernel
from kernels.lora_linear import fused_lora_linear, lora_dropout_mask
from kernels.lora_torch import lora_linear_torch
from kernels.reference import lora_linear_reference
from kernels.triton_launch import recording_launches

# (atol, rtol) against the float64 reference; atol is relative to the largest |reference| value.
# fp16/bf16: the rank-r activations hs and g are rounded to the input dtype between the two GEMMs.
TOL = {torch.float32: (2e-6, 1e-5), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.6e-2, 5e-2)}


def _inputs(
    lead, K, N, r, dtype, device="cpu", segments=None, n=None, bias=True, bias_grad=False, w_grad=False, b_zero=False
):
    """x (*lead, K), W (N, K), b (N,), A (S*r, K), B (S*n, r) at unit-ish output scale; A, B, x train."""
    torch.manual_seed(0)
    S = 1 if segments is None else len(segments)
    n = N if n is None else n
    x = torch.randn(*lead, K, device=device).to(dtype).requires_grad_(True)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype).requires_grad_(w_grad)
    b = (torch.randn(N, device=device) * 0.1).to(dtype).requires_grad_(bias_grad) if bias else None
    a = (torch.randn(S * r, K, device=device) / K**0.5).to(dtype).requires_grad_(True)
    bb = torch.zeros(S * n, r, device=device) if b_zero else torch.randn(S * n, r, device=device) / r**0.5
    return x, w, b, a, bb.to(dtype).requires_grad_(True)


def _leaves(x, w, b, a, bb):
    return {
        k: t for k, t in dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb).items() if t is not None and t.requires_grad
    }


def _check_parity(tensors, scale, p=0.0, training=False, segments=None, seed=1234, x_view=None):
    """Fused vs float64 reference: y and the gradient of every leaf that requires grad."""
    x, w, b, a, bb = tensors
    xin = x if x_view is None else x_view(x)
    y = fused_lora_linear(xin, w, b, a, bb, scale, p, training, segments, seed=seed)
    assert y.shape == (*xin.shape[:-1], w.shape[0]) and y.dtype == x.dtype
    dy = torch.randn_like(y)
    leaves = _leaves(x, w, b, a, bb)
    grads = torch.autograd.grad(y, list(leaves.values()), dy)

    ref_leaves = {k: t.detach().double().requires_grad_(True) for k, t in leaves.items()}
    rx, rw, rb, ra, rbb = (
        ref_leaves.get(k, t.detach().double() if t is not None else None)
        for k, t in dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb).items()
    )
    rxin = rx if x_view is None else x_view(rx)
    mask = lora_dropout_mask(seed, xin.shape, p, x.device) if (p > 0 and training) else None
    ref = lora_linear_reference(rxin, rw, rb, ra, rbb, scale, p, training, segments, dropout_mask=mask)
    ref_grads = torch.autograd.grad(ref, list(ref_leaves.values()), dy.double())

    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)
    for name, g, gr in zip(leaves, grads, ref_grads):
        assert g.dtype == x.dtype and g.shape == gr.shape, name
        torch.testing.assert_close(
            g.double(),
            gr,
            atol=atol * max(1.0, gr.abs().max().item()),
            rtol=rtol,
            msg=lambda m, name=name: f"d{name}: {m}",
        )
    return y, grads


# The interpreter runs every program in Python (~0.5-2 s per fwd+bwd here), so few cases, chosen to
# cover: sizes that are no multiple of any block (M=197, K=100, N=75), r=3 and 8, leading dims,
# bias frozen / trainable / absent, trainable W, dropout on, scale != 1, fp32 and fp16.
@pytest.mark.parametrize(
    "lead, K, N, r, dtype, bias, p, scale",
    [
        ((197,), 100, 75, 3, torch.float32, "train", 0.0, 0.5),
        ((197,), 100, 75, 8, torch.float16, None, 0.0, 2.0),
        ((2, 37), 64, 48, 8, torch.float32, "frozen", 0.25, 1.5),
        ((3, 20), 40, 72, 4, torch.float16, "frozen", 0.1, 1.0),
    ],
)
def test_forward_backward_match_reference(lead, K, N, r, dtype, bias, p, scale):
    tensors = _inputs(lead, K, N, r, dtype, bias=bias is not None, bias_grad=bias == "train")
    _check_parity(tensors, scale, p, training=p > 0)


def test_trainable_weight_gets_its_gradient():
    tensors = _inputs((45,), 33, 20, 4, torch.float32, w_grad=True, bias_grad=True)
    _check_parity(tensors, 0.75)


@pytest.mark.parametrize("layout", ["transposed", "strided_last_dim"])
def test_non_contiguous_x(layout):
    """x as a column-major (M, K) view, or every other feature of a wider tensor: no copy needed."""
    _, w, b, a, bb = _inputs((1,), 48, 24, 4, torch.float32)
    if layout == "transposed":
        x = torch.randn(48, 70).requires_grad_(True)
        view = lambda t: t.t()  # noqa: E731 - (70, 48) with strides (1, 70)
    else:
        x = torch.randn(2, 30, 96).requires_grad_(True)
        view = lambda t: t[..., ::2]  # noqa: E731 - (2, 30, 48), last stride 2
    assert not view(x).is_contiguous()
    _check_parity((x, w, b, a, bb), 1.0, x_view=view)


@pytest.mark.parametrize(
    "dim, segments, p, dtype",
    [
        (32, (0, 64), 0.0, torch.float32),  # q and v of a fused qkv (N = 3*dim); tiles straddle segments
        (25, (10, 60), 0.2, torch.float16),  # widths and offsets aligned to nothing, with dropout
    ],
)
def test_output_segments(dim, segments, p, dtype):
    N = 3 * dim if segments == (0, 64) else 100
    tensors = _inputs((50,), 40, N, 4, dtype, segments=segments, n=dim, bias_grad=True)
    y, _ = _check_parity(tensors, 0.5, p, training=p > 0, segments=segments)
    x, w, b, *_ = tensors
    # columns outside every segment carry the plain linear layer
    untouched = torch.ones(N, dtype=torch.bool)
    for off in segments:
        untouched[off : off + dim] = False
    base = F.linear(x.detach().double(), w.double(), b.detach().double())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.detach().double()[:, untouched], base[:, untouched], atol=atol, rtol=rtol)


def test_zero_b_gives_the_base_output_exactly():
    """LoRA init (B = 0): the update adds exact zeros, whatever A is; dA = 0 exactly, dB does not vanish."""
    x, w, b, a, bb = _inputs((70,), 48, 40, 8, torch.float32, b_zero=True)
    y1 = fused_lora_linear(x, w, b, a, bb, 2.0)
    y2 = fused_lora_linear(x, w, b, torch.randn_like(a), bb, 2.0)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    da, dbb = torch.autograd.grad(y1, [a, bb], torch.randn_like(y1))
    assert torch.count_nonzero(da) == 0
    assert dbb.abs().max() > 0


def test_dropout_mask_is_seeded_and_has_rate_p():
    m1 = lora_dropout_mask(7, (64, 128), 0.3, "cpu")
    assert m1.shape == (64, 128) and m1.dtype == torch.bool
    assert torch.equal(m1, lora_dropout_mask(7, (64, 128), 0.3, "cpu"))
    assert not torch.equal(m1, lora_dropout_mask(8, (64, 128), 0.3, "cpu"))
    assert abs(m1.float().mean().item() - 0.7) < 0.03
    assert lora_dropout_mask(7, (4, 16, 128), 0.3, "cpu").reshape(64, 128).equal(m1)


def test_dropout_off_in_eval_and_seed_from_torch_generator():
    x, w, b, a, bb = _inputs((30,), 32, 16, 4, torch.float32)
    ref = lora_linear_reference(x, w, b, a, bb, 1.0)
    torch.testing.assert_close(fused_lora_linear(x, w, b, a, bb, 1.0, 0.5, training=False), ref)
    torch.manual_seed(3)
    y1 = fused_lora_linear(x, w, b, a, bb, 1.0, 0.5, training=True)
    torch.manual_seed(3)
    y2 = fused_lora_linear(x, w, b, a, bb, 1.0, 0.5, training=True)
    assert torch.equal(y1, y2) and not torch.allclose(y1, ref)


@pytest.mark.parametrize("fn", [fused_lora_linear, lora_linear_torch], ids=["triton", "torch"])
def test_dropout_replays_under_activation_checkpointing(fn):
    """Grad checkpointing re-runs the forward in backward: both backends draw their dropout from
    torch's RNG (a seed, or the mask itself), whose state checkpoint restores, so the recomputed mask
    and the gradients are the same as without it."""
    x, w, b, a, bb = _inputs((40,), 32, 24, 4, torch.float32)
    step = lambda t: fn(t, w, b, a, bb, 1.0, 0.3, True)  # noqa: E731
    torch.manual_seed(11)
    g_plain = torch.autograd.grad(step(x).square().sum(), [x, a, bb])
    torch.manual_seed(11)
    y = torch.utils.checkpoint.checkpoint(step, x, use_reentrant=False)
    g_ckpt = torch.autograd.grad(y.square().sum(), [x, a, bb])
    for g1, g2 in zip(g_plain, g_ckpt):
        torch.testing.assert_close(g1, g2, atol=0, rtol=0)


def test_stride_zero_output_gradient():
    """``y.sum().backward()`` hands the kernel an expanded (stride-0) dy."""
    x, w, b, a, bb = _inputs((2, 33), 24, 20, 4, torch.float32)
    fused_lora_linear(x, w, b, a, bb, 1.0).sum().backward()
    xr, ar, br = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
    lora_linear_reference(xr, w, b, ar, br, 1.0).sum().backward()
    for g, gr in ((x.grad, xr.grad), (a.grad, ar.grad), (bb.grad, br.grad)):
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


def test_empty_batch():
    x, w, b, a, bb = _inputs((0, 5), 16, 12, 2, torch.float32)
    y = fused_lora_linear(x, w, b, a, bb, 1.0)
    assert y.shape == (0, 5, 12)
    dx, da = torch.autograd.grad(y.sum(), [x, a])
    assert dx.shape == x.shape and torch.count_nonzero(da) == 0


def test_rejects_bad_inputs_with_plain_errors(monkeypatch):
    x, w, b, a, bb = _inputs((8,), 16, 12, 2, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        fused_lora_linear(x, w, b, a[:, :8], bb, 1.0)
    with pytest.raises(ValueError, match="segments"):
        fused_lora_linear(x, w, b, torch.cat([a, a]), torch.cat([bb, bb])[:16], 1.0, segments=(4, 0))
    with pytest.raises(ValueError, match="dropout_p"):
        fused_lora_linear(x, w, b, a, bb, 1.0, 1.0, True)
    with pytest.raises(ValueError, match="float64") as info:
        fused_lora_linear(x.double(), w.double(), None, a.double(), bb.double(), 1.0)
    assert "--" not in str(info.value)  # kernels name no CLI flags; kernels.dispatch falls back instead
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA"):
        fused_lora_linear(x, w, b, a, bb, 1.0)


@pytest.mark.parametrize("segments, aligned", [((0, 64), True), ((10, 60), False), (None, True)])
def test_segment_alignment_reaches_the_kernels(segments, aligned):
    """Offsets that are multiples of 16 are declared aligned (vector loads); the others are not."""
    N = 96 if segments == (0, 64) else 100
    x, w, b, a, bb = _inputs((40,), 32, N, 4, torch.float32, segments=segments, n=32 if segments else None)
    segs = list(segments) if segments else [0]
    with recording_launches() as launches:
        y, _ = torch.ops.geoexplora.lora_linear_fwd(x, w, b, a, bb, segs, bb.shape[0] // len(segs), 1.0, 0.0, None)
        torch.autograd.grad(y, [x, a, bb], torch.randn_like(y))
    flags = {(name, kw["SEG_ALIGNED"]) for name, _, _, _, kw in launches}
    # the forward down-projection and dA read from column 0; the GEMM, g and dB read the segments
    assert ("lora_gemm", aligned) in flags and ("lora_wgrad", aligned) in flags
    assert ("lora_down", True) in flags and ("lora_down", aligned) in flags


def test_tiles_are_fixed_per_shape_not_autotuned():
    """An autotuner times configs per process, so ranks could pick different tiles; ours are a pure
    function of the shape, dtype and GPU model."""
    for kernel in (lora_kernel._lora_down_kernel, lora_kernel._lora_gemm_kernel, lora_kernel._lora_wgrad_kernel):
        assert not isinstance(kernel, triton.runtime.Autotuner)
    x, w, b, a, bb = _inputs((70,), 48, 40, 8, torch.float32)
    runs = []
    for _ in range(2):
        with recording_launches() as launches:
            torch.ops.geoexplora.lora_linear_fwd(x, w, b, a, bb, [0], 40, 1.0, 0.0, None)
        runs.append([(name, grid, kw) for name, _, grid, _, kw in launches])
    assert runs[0] == runs[1]


def test_custom_op_registration_opcheck():
    """Schema, fake tensor and autograd registration of the forward op (torch.library's own checks)."""
    x, w, b, a, bb = _inputs((20,), 16, 12, 4, torch.float32)
    seed = torch.tensor([5])
    torch.library.opcheck(
        torch.ops.geoexplora.lora_linear_fwd.default,
        (x, w, b, a, bb, [0], 12, 0.5, 0.2, seed),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_traces_under_torch_compile():
    """The custom ops keep the kernel in one piece under dynamo + AOT autograd (no Inductor C++ build)."""
    x, w, b, a, bb = _inputs((2, 19), 24, 18, 4, torch.float32)
    fn = torch.compile(lambda *t: fused_lora_linear(*t, 0.5, segments=None), backend="aot_eager", fullgraph=True)
    y = fn(x, w, b, a, bb)
    dx, da = torch.autograd.grad(y.square().sum(), [x, a])
    y_ref = fused_lora_linear(x, w, b, a, bb, 0.5)
    dx_ref, da_ref = torch.autograd.grad(y_ref.square().sum(), [x, a])
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(da, da_ref)


# ------------------------------------------------------------------------------------------------
# Compiled kernel on a real GPU (skipped without CUDA): ViT-B shapes, bf16/fp16/fp32.
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N, segments, r, p", [(768, None, 16, 0.0), (2304, (0, 1536), 8, 0.1), (3072, None, 64, 0.0)])
def test_gpu_parity_vit_shapes(dtype, N, segments, r, p):
    n = 768 if segments else N
    tensors = _inputs((4, 197), 768, N, r, dtype, device="cuda", segments=segments, n=n, bias_grad=True)
    _check_parity(tensors, 2.0, p, training=p > 0, segments=segments)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    x, w, b, a, bb = _inputs((2, 197), 768, 2304, 8, torch.bfloat16, device="cuda", segments=(0, 1536), n=768)
    fn = torch.compile(lambda *t: fused_lora_linear(*t, 2.0, segments=(0, 1536)))
    y = fn(x, w, b, a, bb)
    y_ref = fused_lora_linear(x, w, b, a, bb, 2.0, segments=(0, 1536))
    torch.testing.assert_close(y, y_ref)
    dx, da = torch.autograd.grad(y.float().square().sum(), [x, a])
    dx_ref, da_ref = torch.autograd.grad(y_ref.float().square().sum(), [x, a])
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(da, da_ref)
