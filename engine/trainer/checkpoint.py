"""Crash-safe, resumable checkpoints: DeepSpeed's engine state plus our metadata and per-rank state.

Layout under ``<output_dir>/checkpoints/``::

    step_00000500/                     one complete checkpoint (never modified after the rename)
        mp_rank_00_model_states.pt     DeepSpeed: module state (ZeRO-3: + zero_pp_rank_* per rank)
        *zero_pp_rank_*_optim_states.pt  DeepSpeed: this rank's optimizer partition (ZeRO >= 1)
        rank_00000.pt ...              ours, one per rank: RNG states, data position, and the
                                       module extra state (EMA teacher: ZeRO-3 shards are per rank)
        meta.json                      ours, written last: step, world size, config, git revision
    latest                             tag of the newest complete checkpoint (DeepSpeed's format)
    zero_to_fp32.py                    DeepSpeed's offline consolidation script

Atomicity: every rank writes into ``.tmp-step_XXXXXXXX/``; after a barrier rank 0 writes
meta.json, fsyncs, renames the directory to ``step_XXXXXXXX`` and only then rewrites ``latest``.
A crash at any point leaves either no new checkpoint or a complete one; ``.tmp-*`` leftovers are
removed at the next start. "Complete" = the name has no temp prefix and meta.json parses with
``complete: true``, so resume never picks a half-written checkpoint even if ``latest`` is stale.

Assumes ``output_dir`` is on a filesystem every rank sees (the usual shared FS of a cluster).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from engine.atomic import TMP_PREFIX, atomic_write_text, fsync_dir
from engine.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "geoexplora-ckpt/1"
_TAG_RE = re.compile(r"^step_(\d{8,})$")
LATEST = "latest"
META = "meta.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def read_meta(path: Path) -> Optional[dict]:
    """meta.json of checkpoint dir ``path`` if it is complete, else None."""
    if path.name.startswith(TMP_PREFIX) or not _TAG_RE.match(path.name):
        return None
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("complete") is not True:
        return None
    return meta


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        meta = read_meta(p) if p.is_dir() else None
        if meta is not None:
            found.append((int(meta["step"]), p))
    return sorted(found)


def resolve_resume(spec: str, output_dir: Path) -> Optional[Path]:
    """``--train.resume`` -> the checkpoint directory to load, or None to start fresh.

    'none': start fresh. 'auto': the newest complete checkpoint in ``output_dir`` (None if there
    is none yet -- a first run). PATH: a checkpoint directory, or a run / checkpoints directory
    (its newest complete checkpoint).
    """
    if spec == "none":
        return None
    if spec == "auto":
        found = complete_checkpoints(output_dir / "checkpoints")
        return found[-1][1] if found else None
    p = Path(spec)
    if read_meta(p) is not None:
        return p
    for d in (p / "checkpoints", p):
        found = complete_checkpoints(d)
        if found:
            return found[-1][1]
    raise UserError(f"--train.resume: '{spec}' is not a complete checkpoint (step_XXXXXXXX with meta.json) "
                    "nor a run directory holding one; use auto, none or such a path")


# --------------------------------------------------------------------------------------------
# Per-rank state
# --------------------------------------------------------------------------------------------
def _has_extra_state(m: nn.Module) -> bool:
    return type(m).get_extra_state is not nn.Module.get_extra_state


def extra_state(module: nn.Module) -> dict[str, Any]:
    """{submodule name: get_extra_state()} for submodules that define one (the EMA teacher).

    DeepSpeed saves the module state dict from rank 0 only, but under ZeRO-3 the teacher's EMA is
    partitioned like the weights, so every rank saves its own copy in its rank file.
    """
    return {name: m.get_extra_state() for name, m in module.named_modules() if _has_extra_state(m)}


def load_extra_state(module: nn.Module, state: dict[str, Any]) -> None:
    mods = dict(module.named_modules())
    for name, s in state.items():
        if name not in mods:
            raise UserError(f"--train.resume: checkpoint has state for module '{name}' that this model lacks")
        mods[name].set_extra_state(s)


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------
def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_tree(root: Path) -> None:
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(d)


class CheckpointManager:
    """Saves/loads checkpoints of one run directory. Every rank calls ``save``/``load`` together.

    rank, world_size: this process's place. keep_last: complete checkpoints kept (oldest pruned).
    """

    def __init__(self, output_dir: Path, rank: int, world_size: int, keep_last: int = 3):
        self.dir = Path(output_dir) / "checkpoints"
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last

    def remove_temp(self) -> None:
        """Rank 0: delete ``.tmp-*`` leftovers of interrupted saves (call before training starts)."""
        if self.rank != 0 or not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                log.info("removing unfinished checkpoint %s", p.name)
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def save(self, engine, step: int, rank_state: dict, meta: dict) -> Path:
        """Write checkpoint ``step`` (optimizer steps done). rank_state: this rank's own state
        (RNG, data position, extra state). meta: rank 0's JSON-able metadata (config, git, ...)."""
        tag = tag_for(step)
        final = self.dir / tag
        tmp_tag = TMP_PREFIX + tag
        tmp = self.dir / tmp_tag
        t0 = time.perf_counter()
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            if final.exists():  # re-saving a step (resumed from it, stopped at once): replace it
                shutil.rmtree(final)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state={"step": step}, save_latest=False)
        torch.save(rank_state, tmp / rank_file(self.rank))
        _barrier()
        if self.rank == 0:
            missing = [r for r in range(self.world_size) if not (tmp / rank_file(r)).is_file()]
            if missing:
                raise RuntimeError(f"checkpoint {tag}: rank files missing for ranks {missing}")
            body = dict(meta, format=FORMAT, step=step, tag=tag, world_size=self.world_size,
                        saved=time.strftime("%Y-%m-%dT%H:%M:%S%z"), complete=True)
            (tmp / META).write_text(json.dumps(body, indent=1, default=str))
            _fsync_tree(tmp)
            os.replace(tmp, final)
            fsync_dir(self.dir)
            atomic_write_text(self.dir / LATEST, tag)
            self._prune(keep=final)
            log.info("checkpoint %s saved in %.1fs", final, time.perf_counter() - t0)
        _barrier()
        return final

    def _prune(self, keep: Path) -> None:
        done = complete_checkpoints(self.dir)
        for _, p in done[:-self.keep_last]:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engine, path: Path) -> tuple[dict, Optional[dict]]:
        """Restore engine (module, optimizer) from ``path``; returns (meta, this rank's rank state
        or None when the checkpoint was written by a different world size)."""
        meta = read_meta(path)
        if meta is None:
            raise UserError(f"--train.resume: '{path}' is not a complete checkpoint")
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=True)
        if load_path is None:
            raise UserError(f"--train.resume: DeepSpeed could not load '{path}'")
        if int(meta["world_size"]) != self.world_size:
            log.warning("checkpoint was written by %s ranks, this run has %d: data position and RNG "
                        "streams restart", meta["world_size"], self.world_size)
            return meta, None
        state = torch.load(path / rank_file(self.rank), map_location="cpu", weights_only=False)
        return meta, state
