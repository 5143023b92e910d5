"""Backend choice for the fused ops: one entry point per op, the backend chosen per call's shape class.

Order of precedence: environment (``GEOEXPLORA_ATTENTION`` for attention, ``GEOEXPLORA_KERNELS``
for both ops), then :func:`set_backend` (the run config's ``kernels`` section), then ``auto``.

``auto`` never hands users an unmeasured kernel. It takes a Triton kernel only on a CUDA device for
which the kernel record (``kernels.record``, written by ``python -m kernels.verify``) says, for this
device model, these torch/triton versions and this call's shape class, that the kernel passed its
parity checks and was faster than the alternative. Everywhere else ``auto`` uses the fast torch
LoRA path (``kernels.lora_torch``) and PyTorch SDPA.

Once a Triton kernel is chosen (by ``auto`` or forced), inputs it cannot take -- fp64, a head dim
over 128, tensors on a CPU without the interpreter -- go to the torch path / SDPA, with one log line
per reason. This module is also where the kernels' plain errors meet the user: a bad backend name in
the environment, or xformers requested but missing, is a ``UserError``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from engine.errors import UserError
from kernels import record
from kernels.lora_torch import lora_linear_torch
from kernels.reference import attention_reference, lora_linear_reference

log = logging.getLogger(__name__)

BACKENDS = {
    "lora_linear": ("auto", "torch", "triton", "reference"),
    "attention": ("auto", "triton", "xformers", "sdpa", "reference"),
}
# What auto uses where no record entry allows the Triton kernel.
DEFAULT = {"lora_linear": "torch", "attention": "sdpa"}
_ENV = {"lora_linear": ("GEOEXPLORA_KERNELS",), "attention": ("GEOEXPLORA_ATTENTION", "GEOEXPLORA_KERNELS")}
# GEOEXPLORA_KERNELS names one choice for both ops; for attention "torch" means PyTorch's SDPA.
_SHARED_FOR_ATTENTION = {"auto": "auto", "triton": "triton", "reference": "reference", "torch": "sdpa"}

_configured: dict[str, str] = {"lora_linear": "auto", "attention": "auto"}
_logged: set[tuple] = set()
# (record path, device index) -> (machine key, record): read once per process and device
_records: dict[tuple[str, int], tuple[str, dict]] = {}


def set_backend(op: str, name: str) -> None:
    """Select ``name`` for ``op`` (from the run config); the environment still takes precedence."""
    if name not in BACKENDS[op]:
        raise ValueError(f"unknown {op} backend {name!r}; choose from {', '.join(BACKENDS[op])}")
    _configured[op] = name


def requested_backend(op: str) -> str:
    """The backend asked for: environment, else config, else ``auto``."""
    for var in _ENV[op]:
        val = os.environ.get(var, "").strip().lower()
        if not val:
            continue
        if val in BACKENDS[op]:
            return val
        if var == "GEOEXPLORA_KERNELS" and op == "attention" and val in _SHARED_FOR_ATTENTION:
            return _SHARED_FOR_ATTENTION[val]
        choices = sorted(set(BACKENDS[op]) | (set(_SHARED_FOR_ATTENTION) if var == "GEOEXPLORA_KERNELS" else set()))
        raise UserError(f"{var}={val!r} is not a backend for {op}; choose from {', '.join(choices)}")
    return _configured[op]


def _log_once(key: tuple, level: int, msg: str, *args) -> None:
    # Logging inside a region torch.compile traces is a graph break; the first eager call logs.
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        log.log(level, msg, *args)


def _machine_record(device: torch.device) -> tuple[str, dict]:
    path = record.record_path()
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (str(path), index)
    if key not in _records:
        _records[key] = (record.machine_key(record.device_info(torch.device("cuda", index))), record.load_record(path))
    return _records[key]


def measured_faster(device: torch.device, shape_class: str) -> bool:
    """Whether the kernel record allows the Triton kernel for ``shape_class`` on ``device``."""
    if device.type != "cuda":
        return False
    machine, data = _machine_record(device)
    return record.kernel_allowed(data, machine, shape_class)


def resolve(op: str, device: torch.device, shape_class: str | None = None) -> str:
    """The backend ``op`` runs with on ``device`` for a call of ``shape_class`` (logged once per
    op / device type / backend)."""
    name = requested_backend(op)
    if name == "auto":
        name = "triton" if shape_class is not None and measured_faster(device, shape_class) else DEFAULT[op]
    _log_once((op, device.type, name), logging.INFO, "kernels: %s on %s uses the %s backend", op, device.type, name)
    return name


def _fallback(op: str, reason: str) -> str:
    fallback = DEFAULT[op]
    _log_once(
        (op, "fallback", reason),
        logging.WARNING,
        "kernels: the Triton %s kernel cannot take %s; those calls use %s",
        op,
        reason,
        fallback,
    )
    return fallback


def _lora_class(x: torch.Tensor, weight: torch.Tensor, lora_b: torch.Tensor, segments) -> str | None:
    if x.device.type != "cuda":
        return None
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    N, K = weight.shape
    return record.lora_class(
        x.numel() // max(K, 1), K, N, lora_b.shape[1], 1 if segments is None else len(segments), dtype
    )


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
    segments: Sequence[int] | None = None,
) -> torch.Tensor:
    """``y = x W^T + b + scale * (drop(x) A^T) B^T`` (see kernels.reference for ``segments``)."""
    requested = requested_backend("lora_linear")
    shape_class = _lora_class(x, weight, lora_b, segments) if requested == "auto" else None
    name = resolve("lora_linear", x.device, shape_class)
    if name == "triton":
        from kernels.lora_linear import fused_lora_linear, unsupported_reason

        reason = unsupported_reason(x)
        if reason is None:
            return fused_lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p, training, segments)
        name = _fallback("lora_linear", reason)
    if name == "reference":
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, dropout_p, training, segments)
    return lora_linear_torch(x, weight, bias, lora_a, lora_b, scale, dropout_p, training, segments)


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Non-causal self-attention ``softmax(q k^T * scale) v``; q, k, v: (B, H, N, D) -> (B, H, N, D)."""
    auto = requested_backend("attention") == "auto" and q.device.type == "cuda"
    shape_class = record.attention_class(k.shape[2], q.shape[3], q.dtype) if auto else None
    name = resolve("attention", q.device, shape_class)
    if name == "triton":
        from kernels.attention import flash_attention, unsupported_reason

        reason = unsupported_reason(q, k, v)
        if reason is None:
            return flash_attention(q, k, v, scale)
        name = _fallback("attention", reason)
    if name == "xformers":
        if not xformers_available():
            raise UserError(
                "attention backend 'xformers' requested but xformers does not import; "
                "install it, or choose another backend (kernels.attention / GEOEXPLORA_ATTENTION)"
            )
        import xformers.ops as xops

        # xformers wants (B, N, H, D)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    if name == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return attention_reference(q, k, v, scale)
