"""Preflight: one real-size training step of a config, before any GPU hours are booked.

``launchers/pretrain.py --config X --preflight`` (and ``finetune.py``) builds the model, recipe,
objective and DeepSpeed engine exactly as the run would (same ZeRO stage, precision, optimizer
groups, schedules), feeds one synthetic batch of the config's real shapes (crop sizes, crop counts,
bands, iBOT masks from the real mask generator) and runs one forward + backward + optimizer step
per rank; no data is read. It reports the trainable/frozen split, peak memory per rank (CUDA max
allocated; on CPU the process's peak RSS), model FLOPs per image, which tensors the step changed
(every trainable one that should, no frozen one) and ends with one JSON line. The CI preset test
(tests/launchers/test_preset_steps.py) runs every shipped config through this path on CPU.

``--preflight`` uses one sample per rank; ``--preflight=N`` N samples (mixup/cutmix need an even
number). The step uses the run's lr schedule at step 0 and one micro-batch (no accumulation).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from engine.objectives.objective import Objective
from engine.trainer import deepspeed_setup
from engine.trainer.schedules import OptimSchedule

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Synthetic batches of the config's real shapes (already normalised, on the device)
# ---------------------------------------------------------------------------------------------
def pretrain_batch(
    cfg, objective_name: str, patch: int, groups: int, samples: int, device: torch.device, seed: int = 0
) -> dict:
    """DINO: ``global_crops``/``local_crops``/``masks`` as engine/data's multi-crop yields them
    (crop-major, iBOT block masks from :func:`engine.data.masking.ibot_masks`); MAE: ``images``."""
    from engine.data.masking import ibot_masks

    g = torch.Generator().manual_seed(seed)
    c, chans = cfg.crops, cfg.model.in_chans
    if objective_name == "mae":
        return {"images": torch.randn(samples, chans, c.global_size, c.global_size, generator=g).to(device)}
    batch = {"global_crops": torch.randn(c.num_global * samples, chans, c.global_size, c.global_size, generator=g)}
    if c.num_local:
        batch["local_crops"] = torch.randn(c.num_local * samples, chans, c.local_size, c.local_size, generator=g)
    side = c.global_size // patch
    d = cfg.objective.dino
    masks = ibot_masks(
        c.num_global * samples,
        (side, side),
        d.mask_ratio,
        d.mask_probability,
        np.random.default_rng(seed),
        num_groups=groups,
        consistent_groups=c.consistent_group_masks,
    )
    if not masks.any():  # one sample at mask_probability 0.5 may draw no mask: the iBOT path must run
        masks = ibot_masks(
            c.num_global * samples,
            (side, side),
            d.mask_ratio,
            1.0,
            np.random.default_rng(seed),
            num_groups=groups,
            consistent_groups=c.consistent_group_masks,
        )
    batch["masks"] = masks
    return {k: v.to(device) for k, v in batch.items()}


def classifier_batch(
    cfg, num_classes: int, multilabel: bool, samples: int, device: torch.device, seed: int = 0
) -> dict:
    """Fine-tuning: ``images`` at model.img_size and labels (class ids, or multi-hot)."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.model.img_size
    images = torch.randn(samples, cfg.model.in_chans, s, s, generator=g)
    labels = (
        (torch.rand(samples, num_classes, generator=g) < 0.3).float()
        if multilabel
        else torch.randint(0, num_classes, (samples,), generator=g)
    )
    return {"images": images.to(device), "labels": labels.to(device)}


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------
def _home(p: torch.Tensor) -> torch.Tensor:
    """This rank's values of ``p``: its ZeRO-3 shard, else the tensor itself."""
    ds = getattr(p, "ds_tensor", None)
    return (p if ds is None else ds).detach()


_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def fingerprint(t: torch.Tensor) -> int:
    """Exact-bits checksum of a tensor (sum of its values read as integers of the same width): any
    realistic in-place change alters it, without keeping a copy of the frozen base."""
    flat = t.contiguous().view(-1)
    if flat.numel() == 0:
        return 0
    return int(flat.view(_INT_VIEW[flat.element_size()]).to(torch.int64).sum().item())


@dataclass
class StepReport:
    """What one preflight step found (see the module docstring); ``as_dict()`` is the JSON line."""

    samples_per_rank: int
    world_size: int
    device: str
    loss: float
    trainable_numel: int
    frozen_numel: int
    trainable: list[str]
    frozen: list[str]
    changed: list[str]
    frozen_changed: list[str]
    frozen_until: dict[str, int]
    peak_memory_bytes: list[int]
    memory_kind: str
    flops_per_image: float
    build_s: float
    step_s: float
    groups: list[dict] = field(default_factory=list)

    @property
    def unchanged(self) -> list[str]:
        return sorted(set(self.trainable) - set(self.changed))

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["unchanged"] = self.unchanged
        d["finite"] = bool(np.isfinite(self.loss))
        return d


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA max allocated"
    # Linux reports ru_maxrss in KiB
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak RSS (CPU process)"


def _gather(value: int) -> list[int]:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return [int(v) for v in out]


def run_step(
    cfg, env, objective: Objective, batch: dict, flops_per_image: float, build_s: float, samples: int
) -> StepReport:
    """One forward + backward + optimizer step of ``objective`` under the DeepSpeed engine of
    ``cfg`` (one micro-batch; lr and weight decay of step 0 for the run's global batch)."""
    run_batch = cfg.data.batch_size * cfg.train.grad_accum_steps * env.world_size
    step_cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, batch_size=samples),
        train=dataclasses.replace(cfg.train, grad_accum_steps=1),
    )
    engine, report = deepspeed_setup.initialize(objective, step_cfg, env.world_size, env.device.type)
    engine.train()
    named = list(objective.named_parameters())
    trainable = {n for n, p in named if p.requires_grad}
    before = {n: _home(p).clone() for n, p in named if n in trainable}
    prints = {n: fingerprint(_home(p)) for n, p in named if n not in trainable}
    t = cfg.train
    low = {"fp16": torch.float16, "bf16": torch.bfloat16 if t.amp == "cast" else None}.get(t.precision)
    if low is not None:  # the model itself is stored in 16 bits: feed it 16-bit images, as the Trainer does
        batch = {k: v.to(low) if v.is_floating_point() else v for k, v in batch.items()}
    sched = OptimSchedule.from_config(cfg.optim, run_batch, cfg.train.max_steps)
    sched.apply(engine.optimizer.param_groups, 0)
    t0 = time.perf_counter()
    loss, _ = engine(batch, 0)
    engine.backward(loss)
    engine.step()
    objective.on_step_end(0)
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    step_s = time.perf_counter() - t0
    changed = sorted(n for n, p in named if n in trainable and not torch.equal(_home(p), before[n]))
    frozen_changed = sorted(n for n, p in named if n not in trainable and fingerprint(_home(p)) != prints[n])
    frozen_until = {n: g["frozen_until"] for g in report.groups if g["frozen_until"] for n in g["names"]}
    peak, kind = _peak_memory(env.device)
    return StepReport(
        samples_per_rank=samples,
        world_size=env.world_size,
        device=str(env.device),
        loss=float(loss.detach().float().item()),
        trainable_numel=report.trainable_numel,
        frozen_numel=report.frozen_numel,
        trainable=sorted(trainable),
        frozen=sorted(n for n, _ in named if n not in trainable),
        changed=changed,
        frozen_changed=frozen_changed,
        frozen_until=frozen_until,
        peak_memory_bytes=_gather(peak),
        memory_kind=kind,
        flops_per_image=float(flops_per_image),
        build_s=round(build_s, 2),
        step_s=round(step_s, 2),
        groups=[{k: g[k] for k in ("group", "tensors", "numel")} for g in report.groups],
    )


def _summary(names: Sequence[str], n: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n})" if len(names) > n else "") if names else "none"


def print_report(r: StepReport, title: str, param_table: str = "") -> None:
    """The human-readable report, then the JSON line (main rank only)."""
    total = r.trainable_numel + r.frozen_numel
    lines = [
        f"preflight: {title}",
        f"  ranks            {r.world_size} on {r.device}, {r.samples_per_rank} sample(s) per rank, one optimizer step",
        f"  parameters       trainable {r.trainable_numel:,}, frozen {r.frozen_numel:,} "
        f"({100.0 * r.trainable_numel / max(total, 1):.2f} % train, heads/decoder included)",
    ]
    if param_table:
        lines += ["    " + line for line in param_table.splitlines()]
    mem = ", ".join(f"rank {i}: {b / 2**30:.2f} GiB" for i, b in enumerate(r.peak_memory_bytes))
    lines += [
        f"  loss             {r.loss:.4f} ({'finite' if np.isfinite(r.loss) else 'NOT FINITE'})",
        f"  time             build {r.build_s:.1f} s, forward + backward + step {r.step_s:.1f} s",
        f"  peak memory      {mem} ({r.memory_kind})",
        f"  FLOPs / image    {r.flops_per_image / 1e9:,.4g} GFLOP per training image (fwd + bwd, model FLOPs)",
        f"  changed          {len(r.changed)} of {len(r.trainable)} trainable tensors; unchanged: "
        f"{_summary(r.unchanged)}",
        f"  frozen changed   {_summary(r.frozen_changed)}",
    ]
    if r.frozen_until:
        lines.append(
            f"  lr 0 for now     {_summary(sorted(r.frozen_until))} (first {max(r.frozen_until.values())} steps)"
        )
    print("\n".join(lines), flush=True)
    print(json.dumps(r.as_dict()), flush=True)


def finish(r: StepReport, is_main: bool, title: str, param_table: str = "") -> int:
    """Print the report; exit code 0 when the loss is finite and no frozen tensor changed, else 1."""
    if is_main:
        print_report(r, title, param_table)
    ok = np.isfinite(r.loss) and not r.frozen_changed
    if not ok:
        log.error(
            "preflight failed: %s",
            "non-finite loss" if not np.isfinite(r.loss) else f"frozen tensors changed: {_summary(r.frozen_changed)}",
        )
    return 0 if ok else 1
