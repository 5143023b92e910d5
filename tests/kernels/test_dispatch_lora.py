"""Backend choice for the LoRA linear in kernels.dispatch, and the LoRA layer on each backend."""

import logging

import pytest
import torch
from torch import nn

import kernels.lora_linear as lora_kernel
from engine.errors import UserError
from kernels import dispatch


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """auto backends, nothing logged yet, no environment override, an empty kernel record."""
    for var in ("GEOEXPLORA_KERNELS", "GEOEXPLORA_ATTENTION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GEOEXPLORA_KERNEL_RECORD", str(tmp_path / "kernels.json"))
    monkeypatch.setattr(dispatch, "_configured", {"lora_linear": "auto", "attention": "auto"})
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setattr(dispatch, "_records", {})


def _args(N=24, K=16, r=4):
    torch.manual_seed(0)
    return (torch.randn(5, K), torch.randn(N, K), torch.randn(N), torch.randn(r, K), torch.randn(N, r), 0.5)


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_auto_takes_the_torch_path_without_a_record():
    assert dispatch.resolve("lora_linear", torch.device("cpu")) == "torch"
    assert dispatch.resolve("lora_linear", torch.device("cpu"), "lora_linear|float32|K16|N24|S1|r<=8|M<4k") == "torch"


def test_auto_calls_the_torch_backend(monkeypatch):
    calls = _spy(monkeypatch, dispatch, "lora_linear_torch")
    args = _args()
    y = dispatch.lora_linear(*args)
    assert calls == [1]
    x, w, b, a, bb, s = args
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b) + s * (x @ a.t()) @ bb.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("env, called", [("triton", "fused"), ("reference", "reference"), ("torch", "torch")])
def test_environment_forces_a_backend(monkeypatch, env, called):
    spies = {
        "fused": _spy(monkeypatch, lora_kernel, "fused_lora_linear"),
        "reference": _spy(monkeypatch, dispatch, "lora_linear_reference"),
        "torch": _spy(monkeypatch, dispatch, "lora_linear_torch"),
    }
    monkeypatch.setenv("GEOEXPLORA_KERNELS", env)
    dispatch.lora_linear(*_args())
    assert {k: len(v) for k, v in spies.items()} == {k: int(k == called) for k in spies}


def test_config_selects_and_environment_wins(monkeypatch):
    dispatch.set_backend("lora_linear", "reference")
    assert dispatch.requested_backend("lora_linear") == "reference"
    monkeypatch.setenv("GEOEXPLORA_KERNELS", "torch")
    assert dispatch.requested_backend("lora_linear") == "torch"
    assert dispatch.requested_backend("attention") == "sdpa"  # "torch" for both ops: no Triton anywhere
    with pytest.raises(ValueError, match="unknown lora_linear backend"):
        dispatch.set_backend("lora_linear", "cublas")


def test_unknown_backend_in_the_environment_is_a_user_error(monkeypatch):
    monkeypatch.setenv("GEOEXPLORA_KERNELS", "cublas")
    with pytest.raises(UserError, match="GEOEXPLORA_KERNELS"):
        dispatch.lora_linear(*_args())


def test_forced_triton_falls_back_once_for_inputs_it_cannot_take(monkeypatch, caplog):
    """fp64 is not a kernel dtype: the call goes to the torch path, with one warning per reason."""
    caplog.set_level(logging.INFO, logger="kernels.dispatch")
    fused = _spy(monkeypatch, lora_kernel, "fused_lora_linear")
    torch_calls = _spy(monkeypatch, dispatch, "lora_linear_torch")
    monkeypatch.setenv("GEOEXPLORA_KERNELS", "triton")
    args = [t.double() if isinstance(t, torch.Tensor) else t for t in _args()]
    for _ in range(3):
        dispatch.lora_linear(*args)
    assert fused == [] and torch_calls == [1, 1, 1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "float64" in warnings[0] and "use torch" in warnings[0]


def test_lora_layer_on_qv_of_fused_qkv_is_the_same_on_every_backend(monkeypatch):
    """engine.model.lora.LoRALinear (q and v adapters on timm's qkv): same output and adapter
    gradients whichever backend dispatch picks, dropout off."""
    from engine.model.lora import LoRALinear

    torch.manual_seed(0)
    dim = 32
    layer = LoRALinear(nn.Linear(dim, 3 * dim), rank=4, alpha=8.0, segments=(0, 2 * dim), segment_width=dim)
    nn.init.normal_(layer.lora_b, std=0.1)
    x = torch.randn(2, 17, dim)
    results = {}
    for backend in ("triton", "torch", "reference"):
        monkeypatch.setenv("GEOEXPLORA_KERNELS", backend)
        layer.zero_grad()
        y = layer(x)
        y.square().mean().backward()
        results[backend] = (y.detach(), layer.lora_a.grad.clone(), layer.lora_b.grad.clone())
    for backend in ("triton", "torch"):
        for got, want in zip(results[backend], results["reference"]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_layer_dropout_matches_the_reference_backend_with_the_same_seed(monkeypatch):
    from engine.model.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 72), rank=4, alpha=8.0, dropout=0.3, segments=(0, 48), segment_width=24).train()
    nn.init.normal_(layer.lora_b, std=0.1)
    x = torch.randn(3, 11, 24)
    out = {}
    for backend in ("torch", "reference"):
        monkeypatch.setenv("GEOEXPLORA_KERNELS", backend)
        torch.manual_seed(9)
        out[backend] = layer(x)
    torch.testing.assert_close(out["torch"], out["reference"], atol=1e-6, rtol=1e-6)
