"""``--deepspeed.config FILE``: a user's DeepSpeed keys merged over the config we generate.

The file (JSON, or YAML) may add any key DeepSpeed knows: ``comms_logger``, ``flops_profiler``,
``communication_data_type``, ``zero_optimization.round_robin_gradients``, ... A key that one of our
flags or the trainer decides is refused with one line naming the key and the flag that sets it; a
different value there would silently contradict config.yaml. The merged config is checked with
DeepSpeed's own parser before any process group exists, and the trainer saves what it hands to
DeepSpeed as ``<output_dir>/deepspeed_config.json``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from engine.errors import UserError

FLAG = "--deepspeed.config"

# Key (dotted; everything under it too) -> the flag that decides it.
OWNED = {
    "train_batch_size": "--data.batch_size and --train.grad_accum_steps",
    "train_micro_batch_size_per_gpu": "--data.batch_size",
    "gradient_accumulation_steps": "--train.grad_accum_steps",
    "gradient_clipping": "--optim.clip_grad",
    "optimizer": "--optim.* (the trainer builds the AdamW optimizer)",
    "scheduler": "--optim.* (the trainer schedules lr and weight decay)",
    "fp16": "--train.precision",
    "bf16": "--train.precision and --train.amp",
    "torch_autocast": "--train.precision and --train.amp",
    "amp": "--train.precision",
    "zero_optimization.stage": "--zero.stage",
    "zero_optimization.offload_optimizer.device": "--zero.offload_optimizer",
    "zero_optimization.offload_param.device": "--zero.offload_param",
    "zero_optimization.reduce_bucket_size": "--zero.bucket_size",
    "zero_optimization.allgather_bucket_size": "--zero.bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size": "--zero.bucket_size",
    "zero_optimization.stage3_max_live_parameters": "--zero.bucket_size",
    "zero_optimization.stage3_max_reuse_distance": "--zero.bucket_size",
}


def read_user_config(path: str) -> dict:
    """The mapping in ``path`` (.json read as JSON, anything else as YAML); UserError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{FLAG}: file '{path}' not found")
    try:
        data = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (ValueError, yaml.YAMLError) as e:
        raise UserError(
            f"{FLAG} {path}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({str(e).splitlines()[0]})"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{FLAG} {path}: must hold a mapping of DeepSpeed keys, got {type(data).__name__}")
    return data


def _leaves(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def merge_user_config(generated: dict, user: dict, path: str, reserved: dict[str, str] | None = None) -> dict:
    """``generated`` with ``user``'s keys added. A key under ``OWNED``, under ``reserved`` ({key: who
    needs it}) or one that ``generated`` already sets raises UserError naming it."""
    ours = dict(_leaves(generated))
    for key, _ in _leaves(user):
        for prefix, flag in OWNED.items():
            if key == prefix or key.startswith(prefix + "."):
                raise UserError(f"{FLAG} {path}: key '{key}' conflicts with {flag}; use that flag instead")
        for prefix, who in (reserved or {}).items():
            if key == prefix or key.startswith(prefix + "."):
                raise UserError(f"{FLAG} {path}: key '{key}' is fixed by {who}; remove it from the file")
        clash = next((k for k in ours if k == key or k.startswith(key + ".") or key.startswith(k + ".")), None)
        if clash is not None:
            what = f"key '{key}' is" if clash == key else f"key '{key}' conflicts with '{clash}', which is"
            raise UserError(
                f"{FLAG} {path}: {what} set by geoexplora (deepspeed_config.json in a run directory "
                f"lists all such keys); remove it from the file"
            )
    merged = copy.deepcopy(generated)
    for key, value in _leaves(user):
        node = merged
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = copy.deepcopy(value)
    return merged


def check_user_config(cfg) -> None:
    """Fail fast, before any process group: read ``cfg.deepspeed.config``, merge it over the config
    generated for ``cfg`` (one rank; the batch keys scale with the world size, which is owned) and
    let DeepSpeed parse the result. No-op without a file."""
    path = cfg.deepspeed.config
    if not path:
        return
    from engine.trainer.deepspeed_setup import build_ds_config

    teacher = {}
    if getattr(getattr(cfg, "objective", None), "name", None) == "dino" and cfg.zero.stage == 3:
        from engine.objectives.teacher import ZERO3_REQUIREMENTS

        teacher = {
            f"zero_optimization.{k}": "the shared-base EMA teacher at --zero.stage 3" for k in ZERO3_REQUIREMENTS
        }
    merged = merge_user_config(
        build_ds_config(cfg, 1, "cuda", user_config=False), read_user_config(path), path, teacher
    )
    validate_with_deepspeed(merged, path)


def validate_with_deepspeed(ds_config: dict, path: str) -> None:
    """DeepSpeed's own parse of ``ds_config`` (unknown zero_optimization keys, bad types, ...)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(copy.deepcopy(ds_config))
    except Exception as e:  # noqa: BLE001 - pydantic ValidationError, AssertionError, ValueError, KeyError...
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[:3]) or type(e).__name__
        raise UserError(f"{FLAG} {path}: DeepSpeed rejects the merged config: {detail}") from None
