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
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.atomic import TMP_PREFIX, atomic_write_text, fsync_dir
from engine.errors import UserError, fs_user_error

log = logging.getLogger(__name__)

FORMAT = "geoexplora-ckpt/1"
_TAG_RE = re.compile(r"^step_(\d{8,})$")
LATEST = "latest"
META = "meta.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def read_meta(path: Path) -> dict | None:
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


def resolve_resume(spec: str, output_dir: Path) -> Path | None:
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
    raise UserError(
        f"--train.resume: '{spec}' is not a complete checkpoint (step_XXXXXXXX with meta.json) "
        "nor a run directory holding one; use auto, none or such a path"
    )


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
class ResumeWorldSizeError(UserError):
    """A ZeRO checkpoint met a different number of ranks; every rank finds the same (``all_ranks``)."""

    all_ranks = True


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, read-only, quota). Every rank raises it with
    the same message (``all_ranks``), so one rank -- rank 0 -- is enough to print it."""

    all_ranks = True


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

    def __init__(
        self,
        output_dir: Path,
        rank: int,
        world_size: int,
        keep_last: int = 3,
        flag: str = "--train.output_dir",
        group=None,
    ):
        self.dir = Path(output_dir) / "checkpoints"
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.flag = flag
        self.group = group  # process group of the save's host-side agreement (None = the default group)

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
        (RNG, data position, extra state). meta: rank 0's JSON-able metadata (config, git, ...).

        File-system failures (disk full, read-only, quota) become one :class:`CheckpointWriteError`
        naming ``output_dir``, the temp directory is removed, and older checkpoints stay untouched.
        Before writing, rank 0 checks that the free space holds another checkpoint the size of the
        last one; after DeepSpeed's part, the ranks agree on the outcome of every write, so all of
        them stop with the same error and none waits for a peer. (A failure inside DeepSpeed's own
        save, which ends in a barrier, ends that rank; the launcher then stops its peers.)
        """
        tag = tag_for(step)
        final = self.dir / tag
        tmp_tag = TMP_PREFIX + tag
        tmp = self.dir / tmp_tag
        t0 = time.perf_counter()
        err: UserError | None = None
        if self.rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                err = self._check_space(tag)
            except OSError as e:
                err = self._user_error(e, tag)
        self._agree(err, tmp)  # also the barrier before anyone writes into tmp
        try:
            engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state={"step": step}, save_latest=False)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            user = self._user_error(e, tag)  # before the cleanup frees the space it diagnoses
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise user from None
        try:
            torch.save(rank_state, tmp / rank_file(self.rank))
        except (OSError, RuntimeError) as e:
            err = self._user_error(e, tag)
        self._agree(err, tmp)
        if self.rank == 0:
            try:
                self._commit(tmp, final, dict(meta, step=step, tag=tag))
            except OSError as e:
                err = self._user_error(e, tag)
        self._agree(err, tmp)
        if self.rank == 0:
            self._prune(keep=final)
            log.info("checkpoint %s saved in %.1fs", final, time.perf_counter() - t0)
        return final

    def _check_space(self, tag: str) -> UserError | None:
        """Rank 0: an error when the free space is below the size of the last complete checkpoint
        (the new one is written before the oldest is pruned, so it needs that much again)."""
        previous = complete_checkpoints(self.dir)
        if not previous:
            return None
        last = previous[-1][1]
        need = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
        free = shutil.disk_usage(self.dir).free
        if free >= need:
            return None
        return CheckpointWriteError(
            f"{self.flag} '{self.dir.parent}': no space left for checkpoint {tag} (the last one, {last.name}, "
            f"takes {need / 1e6:.1f} MB; {free / 1e6:.1f} MB free); free space there or choose another "
            f"directory; {self._kept()}"
        )

    def _kept(self) -> str:
        previous = complete_checkpoints(self.dir)
        if not previous:
            return "there is no earlier checkpoint"
        return f"the last complete checkpoint ({previous[-1][1].name}) is intact; --train.resume auto continues from it"

    def _user_error(self, err: BaseException, tag: str) -> UserError:
        """``err`` of a checkpoint write as a CheckpointWriteError, or ``err`` itself re-raised when it is
        not the file system's fault."""
        user = fs_user_error(err, self.dir.parent, self.flag, f"writing checkpoint {tag}")
        if user is None:
            raise err
        return CheckpointWriteError(f"{user}; {self._kept()}")

    def _commit(self, tmp: Path, final: Path, meta: dict) -> None:
        """Rank 0, every rank's files written: meta.json, fsync, rename into place, then ``latest``."""
        missing = [r for r in range(self.world_size) if not (tmp / rank_file(r)).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {meta['tag']}: rank files missing for ranks {missing}")
        body = dict(
            meta, format=FORMAT, world_size=self.world_size, saved=time.strftime("%Y-%m-%dT%H:%M:%S%z"), complete=True
        )
        (tmp / META).write_text(json.dumps(body, indent=1, default=str))
        _fsync_tree(tmp)
        old = final.with_name(TMP_PREFIX + "old-" + final.name)
        if final.exists():  # re-saving a step (a run resumed from an older checkpoint path): replace it
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(self.dir)
        shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(self.dir / LATEST, final.name)

    def _agree(self, err: UserError | None, tmp: Path) -> None:
        """All ranks: raise on every rank the error of the lowest rank that had one (rank 0 removes
        ``tmp``); return when every rank's writes succeeded. A barrier either way."""
        failed = torch.tensor([0.0 if err is None else 1.0], dtype=torch.float64)
        reasons = [None if err is None else str(err)]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
            if failed.item():
                reasons = [None] * self.world_size
                dist.all_gather_object(reasons, None if err is None else str(err), group=self.group)
        if not failed.item():
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(next(r for r in reasons if r))

    def _prune(self, keep: Path) -> None:
        done = complete_checkpoints(self.dir)
        for _, p in done[: -self.keep_last]:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engine, path: Path) -> tuple[dict, dict | None]:
        """Restore engine (module, optimizer) from ``path``; returns (meta, this rank's rank state
        or None when the checkpoint was written by a different world size)."""
        meta = read_meta(path)
        if meta is None:
            raise UserError(f"--train.resume: '{path}' is not a complete checkpoint")
        saved_ranks, stage = int(meta["world_size"]), int(meta.get("zero_stage") or 0)
        if saved_ranks != self.world_size and stage >= 1:
            # DeepSpeed would stop deep inside load_checkpoint: it cannot re-partition ZeRO state
            raise ResumeWorldSizeError(
                f"--train.resume: '{path}' was written by {saved_ranks} rank(s) with ZeRO-{stage}, this run has "
                f"{self.world_size}; ZeRO's optimizer state is split per rank and DeepSpeed cannot re-split it. "
                f"Resume with {saved_ranks} rank(s) (deepspeed --num_gpus/--num_nodes)"
                + (
                    ", or start a new --train.output_dir from its weights with --model.weights (LoRA merged, "
                    "optimizer restarts)"
                    if stage < 3
                    else ""
                )
            )
        load_path, _ = engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=True,
        )
        if load_path is None:
            raise UserError(f"--train.resume: DeepSpeed could not load '{path}'")
        if int(meta["world_size"]) != self.world_size:
            log.warning(
                "checkpoint was written by %s ranks, this run has %d: data position and RNG streams restart",
                meta["world_size"],
                self.world_size,
            )
            return meta, None
        state = torch.load(path / rank_file(self.rank), map_location="cpu", weights_only=False)
        return meta, state
