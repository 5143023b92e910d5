"""The per-machine kernel record: where a Triton kernel passed its checks and beat the torch path.

``python -m kernels.verify`` (console script ``geoexplora-verify-kernels``) measures each kernel on
the current GPU and writes what it found here; ``kernels.dispatch`` reads it, and ``auto`` picks a
Triton kernel only for a shape class whose entry, for this device model and these torch/triton
versions, says it passed and was at least :data:`MIN_SPEEDUP` times as fast as the alternative
(the fast torch LoRA path, or SDPA). A missing, unreadable or stale record means no Triton kernel.

Path: ``$GEOEXPLORA_KERNEL_RECORD``, else ``$XDG_CACHE_HOME/geoexplora/kernels.json``
(``~/.cache/geoexplora/kernels.json``). Layout::

    {"version": 1,
     "machines": {"<device>|sm<cc>|torch <v>|triton <v>": {
         "device": "NVIDIA H200", "capability": [9, 0], "torch": "...", "triton": "...",
         "written": "<UTC time>",
         "entries": {"<shape class>": {"passed": true, "speedup": 1.42, "kernel_ms": ..,
                                      "baseline": "torch", "baseline_ms": .., "max_rel_err": ..}}}}}
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RECORD_ENV = "GEOEXPLORA_KERNEL_RECORD"
VERSION = 1
# A kernel must beat the alternative by this factor: run-to-run noise of a short benchmark is a few
# per cent, and a kernel that wins by less is not worth its compile time and its extra code path.
MIN_SPEEDUP = 1.05
# Rows of the LoRA GEMM (batch x tokens) by class: launch-bound / a few waves / many waves of tiles.
M_CLASSES = ((4096, "M<4k"), (32768, "M<32k"), (None, "M>=32k"))


def record_path() -> Path:
    """Where the record lives (the environment variable wins)."""
    if os.environ.get(RECORD_ENV):
        return Path(os.environ[RECORD_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "geoexplora" / "kernels.json"


def _pow2_at_least(n: int, floor: int) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


def lora_class(M: int, K: int, N: int, r: int, segments: int, dtype: torch.dtype) -> str:
    """Shape class of one LoRA linear call: x (M, K) -> (M, N), rank r on ``segments`` output slices."""
    m = next(name for limit, name in M_CLASSES if limit is None or M < limit)
    return f"lora_linear|{str(dtype).replace('torch.', '')}|K{K}|N{N}|S{segments}|r<={_pow2_at_least(r, 8)}|{m}"


def attention_class(N: int, D: int, dtype: torch.dtype) -> str:
    """Shape class of one attention call: sequence length N (rounded up to a power of 2), head dim D."""
    return f"attention|{str(dtype).replace('torch.', '')}|D{D}|N<={_pow2_at_least(N, 16)}"


def device_info(device: torch.device) -> dict:
    """The device model and library versions a record entry is valid for."""
    import triton

    major, minor = torch.cuda.get_device_capability(device)
    return {
        "device": torch.cuda.get_device_name(device),
        "capability": [major, minor],
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


def machine_key(info: dict) -> str:
    major, minor = info["capability"]
    return f"{info['device']}|sm{major}{minor}|torch {info['torch']}|triton {info['triton']}"


def load_record(path: Path | None = None) -> dict:
    """The record at ``path`` (default :func:`record_path`); an empty one if absent or unreadable."""
    path = record_path() if path is None else path
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"version": VERSION, "machines": {}}
    except (OSError, ValueError) as e:
        log.warning("kernels: cannot read the kernel record %s (%s): auto uses no Triton kernel", path, e)
        return {"version": VERSION, "machines": {}}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("machines"), dict):
        log.warning("kernels: %s is not a version-%d kernel record: auto uses no Triton kernel", path, VERSION)
        return {"version": VERSION, "machines": {}}
    return data


def kernel_allowed(record: dict, machine: str, shape_class: str) -> bool:
    """True when the record says the kernel passed on ``machine`` for ``shape_class`` and was faster."""
    entry = record.get("machines", {}).get(machine, {}).get("entries", {}).get(shape_class)
    if not isinstance(entry, dict):
        return False
    return entry.get("passed") is True and float(entry.get("speedup") or 0.0) >= MIN_SPEEDUP


def merge_entries(record: dict, info: dict, entries: dict, written: str) -> dict:
    """``record`` with ``entries`` added for the machine ``info`` describes (newer results win)."""
    machines = dict(record.get("machines", {}))
    key = machine_key(info)
    old = machines.get(key, {}).get("entries", {})
    machines[key] = {**info, "written": written, "entries": {**old, **entries}}
    return {"version": VERSION, "machines": machines}
