"""End-of-run export: the small ExPLoRA adapter file and the merged ViT weights, for the student and
(when the objective has one) the EMA teacher.

Under ZeRO-3 every parameter lives as 1/world_size shards (``p.data`` is empty outside forward),
which is how adapter files end up empty when saved naively. We gather each module's parameters
with ``deepspeed.zero.GatheredParameters`` (all ranks take part, one module at a time so no rank
ever holds more than one block's full weights beyond its shards), copy them to fp32 CPU tensors
on rank 0, load them into a freshly built CPU copy of the model (same base weights, same recipe)
and let engine/model write the files. That copy is plain PyTorch, so the files are identical to
what a single-process run would write.

Teacher export: the shared-base EMA teacher (engine/objectives/teacher.py) writes its EMA values
into the trainable tensors inside ``teacher.swapped()``; gathering inside that block reads the
teacher. DINOv2 evaluates its teacher; the student is exported too.

Files in ``<output_dir>/export/``: ``adapter.safetensors`` + ``vit_merged.safetensors`` (student),
``teacher_adapter.safetensors`` + ``teacher_vit_merged.safetensors`` (EMA teacher, DINO).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from engine.config import RunConfig

log = logging.getLogger(__name__)


def gathered_params(params: list[nn.Parameter]):
    """Context in which ZeRO-3-partitioned ``params`` hold their full values (no-op otherwise)."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def gather_state_dict(module: nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """Full state dict of ``module`` as fp32 CPU tensors on the main rank (None on the others).

    Every rank must call it (ZeRO-3 all-gathers). Buffers are never partitioned and are copied
    as they are; non-persistent buffers are left out, like ``state_dict()`` does.
    """
    out: dict[str, torch.Tensor] = {}
    for mod_name, mod in module.named_modules():
        params = list(mod.named_parameters(recurse=False))
        prefix = f"{mod_name}." if mod_name else ""
        with gathered_params([p for _, p in params]):
            if is_main:
                for n, p in params:
                    out[prefix + n] = p.detach().to("cpu", torch.float32).clone()
        if is_main:
            for n, b in mod.named_buffers(recurse=False):
                if b is not None and n not in mod._non_persistent_buffers_set:
                    out[prefix + n] = b.detach().to("cpu").clone()
    return out if is_main else None


def _rebuild(cfg: RunConfig, state: dict[str, torch.Tensor]) -> VisionTransformer:
    """A CPU ViT built like the trained one (base weights + recipe) holding ``state``."""
    from engine.model.explora import apply_explora
    from engine.model.vit import build_vit

    quiet = logging.getLogger("engine.model")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the recipe table was logged once already, at the start of the run
    try:
        vit = build_vit(cfg.model)
        apply_explora(vit, cfg.explora)
    finally:
        quiet.setLevel(level)
    own = vit.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(
            f"export: trained model and rebuilt model differ (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    vit.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return vit


def _write(vit: VisionTransformer, out_dir: Path, prefix: str, seed: int) -> dict[str, Path]:
    """seed: the run's ``train.seed``, under which the launcher built a random-init base."""
    from engine.model.formats.adapter import save_adapter
    from engine.model.formats.merged import export_merged

    return {
        f"{prefix}adapter": save_adapter(vit, out_dir / f"{prefix}adapter.safetensors", seed=seed),
        f"{prefix}merged": export_merged(vit, out_dir / f"{prefix}vit_merged.safetensors"),
    }


def export_run(vit: VisionTransformer, objective: nn.Module, cfg: RunConfig, is_main: bool) -> dict[str, Path]:
    """Write the student's (and EMA teacher's) adapter + merged weights to ``<output_dir>/export``.

    vit: the trained ViT inside ``objective`` (possibly ZeRO-3 partitioned). All ranks call this.
    Returns {name: path} on the main rank, {} elsewhere.
    """
    out_dir = Path(cfg.train.output_dir) / "export"
    states = {"": gather_state_dict(vit, is_main)}
    teacher = getattr(objective, "teacher", None)
    if teacher is not None and hasattr(teacher, "swapped"):
        with teacher.swapped():
            states["teacher_"] = gather_state_dict(vit, is_main)
    written: dict[str, Path] = {}
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for prefix, state in states.items():
            if state is not None:  # gathered onto this (main) rank
                written.update(_write(_rebuild(cfg, state), out_dir, prefix, cfg.train.seed))
        log.info("exported %s", ", ".join(str(p) for p in written.values()))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return written
