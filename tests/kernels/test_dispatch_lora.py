"""Backend choice for the LoRA linear in kernels.dispatch, and the LoRA layer on the Triton path."""
import pytest
import torch
from torch import nn

import kernels.lora_linear as lora_kernel
from engine.errors import UserError
from kernels import dispatch


def _args(N=24, K=16, r=4):
    torch.manual_seed(0)
    return (torch.randn(5, K), torch.randn(N, K), torch.randn(N), torch.randn(r, K), torch.randn(N, r), 0.5)


def test_auto_never_picks_the_unverified_triton_kernel(monkeypatch):
    monkeypatch.delenv("GEOEXPLORA_KERNELS", raising=False)
    assert dispatch.VERIFIED["lora_linear"] == ()
    assert dispatch.resolve("lora_linear", torch.device("cpu")) == "reference"
    assert dispatch.resolve("lora_linear", torch.device("cuda")) == "reference"


def test_env_forces_the_triton_path(monkeypatch):
    calls = []
    real = lora_kernel.fused_lora_linear

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_kernel, "fused_lora_linear", spy)
    monkeypatch.setenv("GEOEXPLORA_KERNELS", "triton")
    args = _args()
    y = dispatch.lora_linear(*args)
    assert len(calls) == 1
    monkeypatch.setenv("GEOEXPLORA_KERNELS", "reference")
    torch.testing.assert_close(y, dispatch.lora_linear(*args), atol=1e-5, rtol=1e-5)
    assert len(calls) == 1


def test_unknown_backend_is_a_user_error(monkeypatch):
    monkeypatch.setenv("GEOEXPLORA_KERNELS", "cublas")
    with pytest.raises(UserError, match="GEOEXPLORA_KERNELS"):
        dispatch.lora_linear(*_args())


def test_lora_layer_on_qv_of_fused_qkv_matches_reference_backend(monkeypatch):
    """engine.model.lora.LoRALinear (q and v adapters on timm's qkv) gives the same output and
    adapter gradients whichever backend dispatch picks, dropout off."""
    from engine.model.lora import LoRALinear

    torch.manual_seed(0)
    dim = 32
    layer = LoRALinear(nn.Linear(dim, 3 * dim), rank=4, alpha=8.0, segments=(0, 2 * dim), segment_width=dim)
    nn.init.normal_(layer.lora_b, std=0.1)
    x = torch.randn(2, 17, dim)
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("GEOEXPLORA_KERNELS", backend)
        layer.zero_grad()
        y = layer(x)
        y.square().mean().backward()
        results[backend] = (y.detach(), layer.lora_a.grad.clone(), layer.lora_b.grad.clone())
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
