"""Our RunConfig -> a DeepSpeed engine: ZeRO stage, precision, accumulation, clipping, AdamW groups.

Only the objective's trainable tensors (``objective.trainable_parameters()``: LoRA, unfrozen blocks,
norms, heads) reach the optimizer, so the frozen ViT base never gets Adam moments, fp32 master
copies or gradient buckets -- the ExPLoRA memory saving. Under ZeRO-3 the frozen base is still
partitioned across ranks (it is the bulk of the weights) but stays out of the optimizer.

The lr and weight decay are set on the param groups every step by ``schedules.OptimSchedule``
(DeepSpeed's own scheduler is not used), so the ``lr``/``weight_decay`` given here are placeholders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.config import OptimConfig, TrainingRun
from engine.errors import UserError
from engine.objectives.objective import Objective

log = logging.getLogger(__name__)

# Effectively "never": DeepSpeed's own per-step prints would duplicate metrics.py.
_NO_DS_PRINTS = 2**31 - 1


def is_no_decay(name: str, p: nn.Parameter, no_decay_lora_b: bool) -> bool:
    """True for tensors trained without weight decay: biases, norms, LayerScale gammas, any 0/1-D
    tensor, the position embedding and cls/register/mask tokens (as timm's ``no_weight_decay``),
    and LoRA B when ``no_decay_lora_b`` (decay on B would pull the adapter update BA towards zero
    independently of A)."""
    parts = name.lower().split(".")
    if p.ndim <= 1 or parts[-1] == "bias" or "gamma" in parts[-1]:
        return True
    if parts[-1] in ("pos_embed", "cls_token", "reg_token", "mask_token"):
        return True
    if any("norm" in part for part in parts):
        return True
    return no_decay_lora_b and parts[-1] == "lora_b"


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]],
    no_decay_lora_b: bool = True,
    lr_mult: Callable[[str], float] | None = None,
    frozen_steps: Callable[[str], int] | None = None,
) -> list[dict]:
    """AdamW param groups over the given (trainable) parameters: 'decay' (wd_mult 1) and
    'no_decay' (wd_mult 0); empty groups are dropped (ZeRO cannot partition an empty group).
    lr_mult: name -> lr multiplier (layer-wise lr decay); frozen_steps: name -> number of first
    steps with lr 0 (DINOv2's prototype-layer freeze). Tensors are grouped by (decay, multiplier,
    frozen steps); each group's ``lr_mult`` scales the scheduled lr and ``frozen_until`` holds it at 0.

    Every group carries ``names`` (parallel to ``params``) for reports; ``lr``/``weight_decay``
    are set per step by ``OptimSchedule.apply``.
    """
    buckets: dict[tuple[bool, float, int], list] = {}
    seen: set[int] = set()
    for name, p in named:
        if not p.requires_grad:
            raise ValueError(f"parameter {name} is frozen but was offered to the optimizer")
        if id(p) in seen:
            continue
        seen.add(id(p))
        key = (
            is_no_decay(name, p, no_decay_lora_b),
            float(lr_mult(name)) if lr_mult else 1.0,
            int(frozen_steps(name)) if frozen_steps else 0,
        )
        buckets.setdefault(key, []).append((name, p))
    groups = []
    for (no_decay, mult, frozen), members in sorted(buckets.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        tag = "no_decay" if no_decay else "decay"
        if mult != 1.0:
            tag += f"@lr_x{mult:.4g}"
        if frozen:
            tag += f"@frozen_{frozen}_steps"
        groups.append(
            {
                "params": [p for _, p in members],
                "names": [n for n, _ in members],
                "group": tag,
                "wd_mult": 0.0 if no_decay else 1.0,
                "lr_mult": mult,
                "frozen_until": frozen,
                "weight_decay": 0.0,
                "lr": 0.0,
            }
        )
    return groups


def _strip_names(groups: list[dict]) -> list[dict]:
    # optimizers keep every key of a group in their state dict; names are for our reports only
    return [{k: v for k, v in g.items() if k != "names"} for g in groups]


def build_optimizer(
    groups: list[dict], optim: OptimConfig, device_type: str, offload: bool = False
) -> tuple[torch.optim.Optimizer, str]:
    """AdamW (decoupled weight decay) over ``groups``; returns (optimizer, implementation name).

    offload (ZeRO-Offload): DeepSpeed's CPU Adam (SIMD C++, JIT-built on first use). On CUDA with
    optimizer 'auto': apex FusedAdam when importable, else DeepSpeed FusedAdam when it was prebuilt
    at install (DS_BUILD_FUSED_ADAM=1; we never trigger a surprise nvcc build), else torch AdamW
    with fused=True. CPU: torch AdamW (foreach).
    """
    kw: dict[str, Any] = dict(lr=0.0, betas=tuple(optim.betas), eps=optim.eps, weight_decay=0.0)
    groups = _strip_names(groups)
    choice = optim.optimizer
    cuda = device_type == "cuda"
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw), "DeepSpeedCPUAdam (ZeRO-Offload)"
    if choice in ("fused", "apex") and not cuda:
        raise UserError(f"--optim.optimizer {choice}: fused optimizers need a CUDA device; use auto or torch")
    if choice in ("auto", "apex") and cuda:
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam
        except ImportError:
            if choice == "apex":
                raise UserError("--optim.optimizer apex: NVIDIA apex is not importable; use auto") from None
        else:
            return ApexFusedAdam(groups, adam_w_mode=True, **kw), "apex FusedAdam"
    if choice == "fused" or (choice == "auto" and cuda and _deepspeed_fused_adam_prebuilt()):
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kw), "DeepSpeed FusedAdam"
    if cuda:
        return torch.optim.AdamW(groups, fused=True, **kw), "torch AdamW (fused)"
    return torch.optim.AdamW(groups, foreach=True, **kw), "torch AdamW (foreach)"


def _deepspeed_fused_adam_prebuilt() -> bool:
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get("fused_adam", False))


def build_ds_config(
    cfg: TrainingRun, world_size: int, device_type: str, zero_overrides: dict | None = None, user_config: bool = True
) -> dict:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` ranks of ``device_type``.

    zero_overrides: zero_optimization entries the objective requires (e.g. the shared-base EMA
    teacher's ZeRO-3 settings); they win over ours. user_config: merge the keys of
    ``--deepspeed.config FILE`` over the result (``ds_user_config.py``; conflicting keys refused).
    """
    t, z = cfg.train, cfg.zero
    if t.precision == "fp16" and device_type != "cuda":
        raise UserError("--train.precision fp16: needs a CUDA device; use bf16 or fp32")
    micro = cfg.data.batch_size
    ds: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": micro * t.grad_accum_steps * world_size,
        "gradient_clipping": float(cfg.optim.clip_grad),
        "steps_per_print": _NO_DS_PRINTS,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"tag_validation": "Fail"},
    }
    if t.precision == "bf16" and t.amp == "autocast":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    zero: dict = {"stage": z.stage}
    if z.stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=device_type == "cuda", reduce_bucket_size=z.bucket_size)
    if z.stage in (1, 2):
        zero.update(allgather_bucket_size=z.bucket_size, reduce_scatter=True)
    if z.stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=z.bucket_size,
            stage3_max_live_parameters=10 * z.bucket_size,
            stage3_max_reuse_distance=10 * z.bucket_size,
        )
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if z.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    zero.update(zero_overrides or {})
    ds["zero_optimization"] = zero
    path = getattr(getattr(cfg, "deepspeed", None), "config", "")
    if user_config and path:
        from engine.trainer.ds_user_config import merge_user_config, read_user_config

        ds = merge_user_config(ds, read_user_config(path), path)
    return ds


@dataclass
class OptimizerReport:
    """What went into the optimizer: for logs, optimizer.json and the memory benchmark."""

    implementation: str
    groups: list[dict] = field(default_factory=list)
    """Per group: {'group', 'wd_mult', 'tensors', 'numel', 'names'}."""
    trainable_numel: int = 0
    frozen_numel: int = 0
    ds_config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "implementation": self.implementation,
            "trainable_numel": self.trainable_numel,
            "frozen_numel": self.frozen_numel,
            "groups": self.groups,
            "ds_config": self.ds_config,
        }


def initialize(objective: Objective, cfg: TrainingRun, world_size: int, device_type: str):
    """Wrap ``objective`` in a DeepSpeed engine. Returns (engine, OptimizerReport).

    objective: its ``trainable_parameters()`` get the optimizer, ``zero_config_overrides(stage)``
    join the ZeRO settings; its ``forward(batch, step)`` returns (loss, logs).
    """
    import deepspeed

    named = list(objective.trainable_parameters())
    if not named:
        raise UserError("--explora.*: the recipe left no trainable parameters; check unfreeze_blocks/lora_targets")
    groups = param_groups(
        named,
        cfg.optim.no_decay_lora_b,
        getattr(objective, "lr_multiplier", None),
        getattr(objective, "frozen_steps", None),
    )
    optimizer, impl = build_optimizer(groups, cfg.optim, device_type, offload=cfg.zero.offload_optimizer)
    ds_config = build_ds_config(cfg, world_size, device_type, objective.zero_config_overrides(cfg.zero.stage))
    trainable_ids = {id(p) for g in groups for p in g["params"]}
    frozen = sum(p.numel() for p in objective.parameters() if id(p) not in trainable_ids)
    report = OptimizerReport(
        implementation=impl,
        groups=[
            {
                "group": g["group"],
                "wd_mult": g["wd_mult"],
                "lr_mult": g["lr_mult"],
                "frozen_until": g["frozen_until"],
                "tensors": len(g["params"]),
                "numel": sum(p.numel() for p in g["params"]),
                "names": g["names"],
            }
            for g in groups
        ],
        trainable_numel=sum(p.numel() for g in groups for p in g["params"]),
        frozen_numel=frozen,
        ds_config=ds_config,
    )
    log.info(
        "optimizer: %s over %d trainable tensors (%.2fM params; %.2fM frozen params get no state); "
        "ZeRO-%d, precision %s%s",
        impl,
        len(trainable_ids),
        report.trainable_numel / 1e6,
        frozen / 1e6,
        cfg.zero.stage,
        cfg.train.precision,
        f" ({cfg.train.amp})" if cfg.train.precision == "bf16" else "",
    )
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, config=ds_config)
    return engine, report
