"""Parity of the Triton flash attention (interpreted on CPU, compiled on GPU) with the fp32 reference,
its launch grid, and the attention backend choice in kernels.dispatch."""

import logging
import math

import pytest
import torch

from engine.errors import UserError
from kernels import dispatch
from kernels.attention import flash_attention
from kernels.reference import attention_reference
from kernels.triton_launch import MAX_GRID_YZ, launch, recording_launches

# (atol, rtol) for O and for dQ/dK/dV against the fp32 reference on the same (rounded) inputs.
# fp16/bf16: P and dS are rounded to the input dtype before the second matmul of each pair.
TOL = {
    torch.float32: ((2e-5, 2e-5), (1e-4, 1e-4)),
    torch.float16: ((2e-3, 2e-3), (1e-2, 1e-2)),
    torch.bfloat16: ((1e-2, 1e-2), (5e-2, 5e-2)),
}


def _fused_qkv(B, H, N, D, dtype, device="cpu", gain=1.0):
    """q, k, v as timm makes them: strided (B, H, N, D) views into one (B, N, 3, H, D) projection."""
    qkv = (torch.randn(B, N, 3, H, D, device=device) * gain).to(dtype).requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    return qkv, q, k, v


def _check_parity(B, H, N, D, dtype, scale, device="cpu", gain=1.0, fn=flash_attention):
    torch.manual_seed(0)
    qkv, q, k, v = _fused_qkv(B, H, N, D, dtype, device, gain)
    out = fn(q, k, v, scale)
    assert out.shape == (B, H, N, D) and out.dtype == dtype
    do = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, do)

    qkv_ref = qkv.detach().float().requires_grad_(True)
    qr, kr, vr = qkv_ref.permute(2, 0, 3, 1, 4).unbind(0)
    ref = attention_reference(qr, kr, vr, scale)
    (g_ref,) = torch.autograd.grad(ref, qkv_ref, do.float())

    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    (oa, orr), (ga, gr) = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=oa, rtol=orr)
    for i, name in enumerate(("dq", "dk", "dv")):
        # Absolute tolerance relative to the gradient's size: with saturated softmax (large logits)
        # dS = P (dP - delta) cancels, so elementwise relative error is not meaningful there.
        scale_g = max(1.0, g_ref[:, :, i].abs().max().item())
        torch.testing.assert_close(
            g[:, :, i].float(), g_ref[:, :, i], atol=ga * scale_g, rtol=gr, msg=lambda m, name=name: f"{name}: {m}"
        )


# Few, cheap cases: the interpreter runs each program instance in Python (~3 s for N=197, B*H=4).
# Together they cover N < block and N with a tail block, D = 64 and padded D (80, 88 -> 128 block; 16),
# fp32 and fp16, B > 1 and H > 1, strided views from a fused qkv, and scale != 1/sqrt(D).
@pytest.mark.parametrize(
    "N, D, dtype, scale",
    [
        (17, 64, torch.float32, 0.3),
        (197, 64, torch.float16, 0.11),
        (197, 80, torch.float32, 80**-0.5),
        (17, 16, torch.float16, 0.5),
        (40, 88, torch.float16, 0.2),
    ],
)
def test_forward_backward_match_reference(N, D, dtype, scale):
    _check_parity(2, 2, N, D, dtype, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_logits_are_stable(dtype):
    """Logits of order 1e3 (exp overflows without the running max): all finite and accurate.

    With a saturated softmax, dQ and dK hinge on ``dP - delta`` cancelling, and ``delta = rowsum(dO * O)``
    is formed -- in every flash kernel -- from O as stored, i.e. rounded to the input dtype. The
    float64 check below uses that same rounded O (PyTorch's fp16 SDPA is off by ~20-50 % from the
    exact dQ here, for the same reason); O and dV are compared with the exact values. The bound
    5e-3 is set by recomputing P = exp(s - lse) with |s| ~ 1e3 (also ~1.6e-3 for fp32 SDPA).
    """
    torch.manual_seed(0)
    qkv = (torch.randn(1, 17, 3, 2, 64) * 12.0).to(dtype).requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = flash_attention(q, k, v, 1.0)
    do = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, do)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()

    q, k, v = (t.double() for t in qkv.detach().permute(2, 0, 3, 1, 4).unbind(0))
    p = torch.softmax(q @ k.transpose(-2, -1), -1)
    o = p @ v
    dp = do.double() @ v.transpose(-2, -1)
    delta = (do.double() * o.to(dtype).double()).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq, dk, dv = g.permute(2, 0, 3, 1, 4).unbind(0)
    expected = {
        "O": (out, o),
        "dQ": (dq, ds @ k),
        "dK": (dk, ds.transpose(-2, -1) @ q),
        "dV": (dv, p.transpose(-2, -1) @ do.double()),
    }
    for name, (got, want) in expected.items():
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 5e-3, f"{name}: relative error {err:.2e}"


def test_uniformly_negative_logits_do_not_leak_padding():
    """Every logit ~ -100 (lse ~ -144 in base 2): padded keys would give exp2(+144) = inf in the
    backward unless they are masked; the result must equal the unshifted attention."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 17, 16) for _ in range(3))
    qs, ks = q.clone(), k.clone()
    qs[..., 0], ks[..., 0] = 10.0, -10.0
    q[..., 0], k[..., 0] = 0.0, 0.0
    qs, ks, v = (t.requires_grad_(True) for t in (qs, ks, v))
    out = flash_attention(qs, ks, v, 1.0)
    torch.testing.assert_close(out, attention_reference(q, k, v, 1.0), atol=1e-4, rtol=1e-4)
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (qs, ks, v), do)
    q, k = q.requires_grad_(True), k.requires_grad_(True)
    v_ref = v.detach().requires_grad_(True)
    dq_r, dk_r, dv_r = torch.autograd.grad(attention_reference(q, k, v_ref, 1.0), (q, k, v_ref), do)
    torch.testing.assert_close(dv, dv_r, atol=1e-4, rtol=1e-4)
    # feature 0 was shifted, so its gradient differs; the others must match
    torch.testing.assert_close(dq[..., 1:], dq_r[..., 1:], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(dk[..., 1:], dk_r[..., 1:], atol=1e-3, rtol=1e-3)


def test_cross_lengths_contiguous_and_default_scale():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 9, 96, requires_grad=True)
    k = torch.randn(1, 2, 40, 96, requires_grad=True)
    v = torch.randn(1, 2, 40, 96, requires_grad=True)
    out = flash_attention(q, k, v)
    ref = attention_reference(q, k, v, 1 / math.sqrt(96))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    grads_ref = torch.autograd.grad(ref, (q, k, v), do)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, atol=1e-4, rtol=1e-4)


def test_expanded_upstream_gradient():
    """``out.sum()`` hands backward a stride-0 dO; strides go to the kernel, so no copy is needed."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))
    grads = torch.autograd.grad(flash_attention(q, k, v).sum(), (q, k, v))
    grads_ref = torch.autograd.grad(attention_reference(q, k, v).sum(), (q, k, v))
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


def test_output_layout_makes_head_merge_free():
    q = torch.randn(2, 3, 17, 16)
    out = flash_attention(q, q, q)
    assert out.transpose(1, 2).is_contiguous()


def test_custom_op_registration_passes_opcheck():
    """Fake (meta) kernels and autograd registration agree with the real op: torch.compile-safe."""
    from kernels.attention import _flash_attn_bwd, _flash_attn_fwd

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(
        _flash_attn_fwd,
        (q, k, v, 0.25),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    o, lse = _flash_attn_fwd(q.detach(), k.detach(), v.detach(), 0.25)
    torch.library.opcheck(
        _flash_attn_bwd,
        (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, 0.25),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(D=160), "head dim D=160"),
        (dict(dtype=torch.float64), "dtypes"),
    ],
)
def test_unsupported_inputs_raise_a_plain_error(bad, match):
    D = bad.get("D", 64)
    dtype = bad.get("dtype", torch.float32)
    q = torch.randn(1, 1, 8, D, dtype=dtype)
    with pytest.raises(ValueError, match=match) as info:
        flash_attention(q, q, q)
    assert "--" not in str(info.value)  # kernels name no CLI flags


def test_mismatched_shapes_raise_value_error():
    with pytest.raises(ValueError, match="shapes do not match"):
        flash_attention(torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32))


def test_launch_grid_takes_4096_crops_by_16_heads():
    """B*H = 65536 programs per query block: more than CUDA allows in grid dimensions 1-2, so every
    kernel folds (query block, batch*head) into dimension 0."""
    B, H, N, D = 4096, 16, 37, 64
    qkv = torch.empty(B, N, 3, H, D, dtype=torch.float16)  # never read: the launches are only recorded
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    with recording_launches() as launches:
        out, lse = torch.ops.geoexplora.flash_attn_fwd(q, k, v, 0.125)
        torch.ops.geoexplora.flash_attn_bwd(torch.empty_like(out), q, k, v, out, lse, 0.125)
    names = [name for name, *_ in launches]
    assert names == ["attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"]
    for name, _, grid, _, kwargs in launches:
        assert all(g <= MAX_GRID_YZ for g in grid[1:]), (name, grid)
        block = kwargs["BLOCK_N"] if name == "attn_bwd_dkdv" else kwargs["BLOCK_M"]
        assert grid[0] == math.ceil(N / block) * B * H, (name, grid)


def test_launch_refuses_a_grid_cuda_cannot_run():
    with pytest.raises(ValueError, match="65535"):
        launch("k", None, (1, 70000), torch.empty(1))


# ---- dispatch -------------------------------------------------------------------------------------


@pytest.fixture
def clean_dispatch(monkeypatch):
    monkeypatch.delenv("GEOEXPLORA_ATTENTION", raising=False)
    monkeypatch.delenv("GEOEXPLORA_KERNELS", raising=False)
    saved = dict(dispatch._configured)
    yield monkeypatch
    dispatch._configured.update(saved)


def test_sdpa_backend_matches_reference(clean_dispatch):
    dispatch.set_backend("attention", "sdpa")
    _check_parity(2, 3, 197, 64, torch.float32, 0.2, fn=dispatch.attention)


def test_auto_uses_sdpa_without_a_record(clean_dispatch):
    assert dispatch.resolve("attention", torch.device("cpu")) == "sdpa"
    assert dispatch.resolve("attention", torch.device("cpu"), "attention|float32|D64|N<=32") == "sdpa"


@pytest.mark.parametrize("D, dtype", [(160, torch.float32), (64, torch.float64)])
def test_forced_triton_falls_back_to_sdpa_for_inputs_it_cannot_take(clean_dispatch, caplog, D, dtype):
    clean_dispatch.setattr(dispatch, "_logged", set())
    clean_dispatch.setenv("GEOEXPLORA_ATTENTION", "triton")
    caplog.set_level(logging.INFO, logger="kernels.dispatch")
    q, k, v = (torch.randn(1, 2, 9, D, dtype=dtype) for _ in range(3))
    for _ in range(2):
        out = dispatch.attention(q, k, v, 0.3)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "use sdpa" in warnings[0] and "cannot take" in warnings[0]


def test_env_overrides_config(clean_dispatch):
    dispatch.set_backend("attention", "reference")
    assert dispatch.resolve("attention", torch.device("cpu")) == "reference"
    clean_dispatch.setenv("GEOEXPLORA_ATTENTION", "triton")
    assert dispatch.resolve("attention", torch.device("cpu")) == "triton"
    calls = []
    import kernels.attention as kattn

    real = kattn.flash_attention
    clean_dispatch.setattr(kattn, "flash_attention", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(1, 2, 17, 16)
    torch.testing.assert_close(
        dispatch.attention(q, q, q, 0.4), attention_reference(q, q, q, 0.4), atol=2e-5, rtol=2e-5
    )
    assert calls == [1]
    clean_dispatch.setenv("GEOEXPLORA_ATTENTION", "bogus")
    with pytest.raises(UserError, match="GEOEXPLORA_ATTENTION"):
        dispatch.resolve("attention", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        dispatch.set_backend("attention", "flash")


def test_xformers_requested_without_xformers_is_a_user_error(clean_dispatch):
    clean_dispatch.setattr(dispatch, "xformers_available", lambda: False)
    dispatch.set_backend("attention", "xformers")
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(UserError, match="xformers"):
        dispatch.attention(q, q, q)


# ---- compiled kernel (CUDA only) ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N, D", [(197, 64), (257, 64), (261, 88), (1025, 64), (197, 80), (257, 128)])
def test_gpu_matches_reference(N, D, dtype):
    _check_parity(4, 6, N, D, dtype, D**-0.5, device="cuda")


@pytest.mark.gpu
def test_gpu_fp32_and_sdpa_agree():
    _check_parity(2, 4, 257, 64, torch.float32, 0.125, device="cuda")
    q, k, v = (torch.randn(2, 4, 257, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(flash_attention(q, k, v), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_launches_4096_crops_by_16_heads():
    """More than 65535 (batch*head) programs: the grid fold keeps the launch valid."""
    _check_parity(4096, 16, 37, 64, torch.bfloat16, 0.125, device="cuda")


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_sequence_length():
    B, H, N, D = 1, 4, 8192, 64
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    flash_attention(q, k, v).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    scores = B * H * N * N * 2  # one fp16 score matrix: 512 MiB here
    assert extra < scores / 8, f"peak extra {extra / 2**20:.0f} MiB is not O(N)"


@pytest.mark.gpu
def test_gpu_torch_compile():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 197, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(lambda a, b, c: flash_attention(a, b, c, 0.2), fullgraph=True)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, flash_attention(q, k, v, 0.2))
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
