"""Backend choice for the fused ops: one entry point per op, chosen once per (op, device type).

Order of precedence: environment (``GEOEXPLORA_ATTENTION`` for attention, ``GEOEXPLORA_KERNELS``
for both ops), then :func:`set_backend` (the run config's ``kernels`` section), then ``auto``.

``auto`` never hands users an unproven kernel: a Triton kernel is chosen automatically only on a
device class listed in ``VERIFIED`` — i.e. where its GPU tests passed and it was measured faster
than the alternative (the table in the README). Until then ``auto`` picks the plain torch path
(SDPA for attention, which has its own flash backend on CUDA). Forcing ``triton`` on CPU works
only under ``TRITON_INTERPRET=1`` (how the tests exercise the kernels).
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch

from engine.errors import UserError
from kernels.reference import attention_reference, lora_linear_reference

log = logging.getLogger(__name__)

BACKENDS = {
    "lora_linear": ("auto", "triton", "reference"),
    "attention": ("auto", "triton", "xformers", "sdpa", "reference"),
}
_ENV = {"lora_linear": ("GEOEXPLORA_KERNELS",), "attention": ("GEOEXPLORA_ATTENTION", "GEOEXPLORA_KERNELS")}

# Device classes (torch.cuda.get_device_name substrings) on which the Triton kernel passed the
# `gpu`-marked tests AND beat the default in kernels/bench. Empty until measured on real GPUs.
VERIFIED: dict[str, tuple[str, ...]] = {"lora_linear": (), "attention": ()}

_configured: dict[str, str] = {"lora_linear": "auto", "attention": "auto"}
_logged: set[tuple[str, str, str]] = set()


def set_backend(op: str, name: str) -> None:
    """Select ``name`` for ``op`` (from the run config); the environment still takes precedence."""
    if name not in BACKENDS[op]:
        raise UserError(f"--kernels.{'lora' if op == 'lora_linear' else op}: unknown backend {name!r}; "
                        f"choose from {', '.join(BACKENDS[op])}")
    _configured[op] = name


def requested_backend(op: str) -> str:
    for var in _ENV[op]:
        val = os.environ.get(var, "").strip().lower()
        if not val:
            continue
        if val in BACKENDS[op]:
            return val
        if var == "GEOEXPLORA_KERNELS" and op == "attention" and val in ("triton", "reference", "auto"):
            return val
        raise UserError(f"{var}={val!r} is not a backend for {op}; choose from {', '.join(BACKENDS[op])}")
    return _configured[op]


def _verified(op: str, device: torch.device) -> bool:
    if device.type != "cuda" or not VERIFIED[op]:
        return False
    name = torch.cuda.get_device_name(device)
    return any(v in name for v in VERIFIED[op])


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def resolve(op: str, device: torch.device) -> str:
    """The backend ``op`` runs with on ``device`` (logged once per op/device type/backend)."""
    name = requested_backend(op)
    if name == "auto":
        if _verified(op, device):
            name = "triton"
        elif op == "attention":
            name = "sdpa"
        else:
            name = "reference"
    key = (op, device.type, name)
    # Logging inside a region torch.compile traces is a graph break; the first eager call logs.
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        log.info("kernels: %s on %s uses the %s backend", op, device.type, name)
    return name


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
    segments: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """``y = x W^T + b + scale * (drop(x) A^T) B^T`` (see kernels.reference for ``segments``)."""
    if resolve("lora_linear", x.device) == "triton":
        from kernels.lora_linear import fused_lora_linear

        return fused_lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p, training, segments)
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, dropout_p, training, segments)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Non-causal self-attention ``softmax(q k^T * scale) v``; q, k, v: (B, H, N, D) -> (B, H, N, D)."""
    name = resolve("attention", q.device)
    if name == "triton":
        from kernels.attention import flash_attention

        return flash_attention(q, k, v, scale)
    if name == "xformers":
        if not xformers_available():
            raise UserError("attention backend 'xformers' requested but xformers does not import; "
                            "install it or use --kernels.attention auto")
        import xformers.ops as xops

        # xformers wants (B, N, H, D)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    if name == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return attention_reference(q, k, v, scale)
