"""The output directory's own files, and the run state that makes ``--resume`` exact.

While a conversion runs, ``<out>/.convert-state/`` holds ``plan.json`` (settings + plan digest)
and, per finished shard, ``<shard>.stats.npz`` (its partial statistics) then ``<shard>.done.json``
(count, bytes, sha256, skipped files, labels): the done record is written last, so it is the
commit point. A shard file without a done record, or whose bytes no longer hash to the record, is
rebuilt. The state directory is removed once manifest.json is in place.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from engine.atomic import TMP_PREFIX
from engine.errors import UserError

log = logging.getLogger(__name__)

STATE_DIR = ".convert-state"
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
PART_FILES = ("part.json", "part-stats.npz")  # a --part run's records for 'merge' (shards.parts)


def _shard_re(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix) + r"-\d{6}\.tar")


def classify(out: Path, prefix: str) -> tuple[list[str], list[str]]:
    """Entries of ``out`` -> (the converter's own, foreign)."""
    if not out.exists():
        return [], []
    if not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a directory; choose a new or empty directory")
    pat = _shard_re(prefix)
    ours: list[str] = []
    foreign: list[str] = []
    for name in sorted(os.listdir(out)):
        own = name in (MANIFEST, SKIPPED, STATE_DIR, *PART_FILES) or name.startswith(TMP_PREFIX) or pat.fullmatch(name)
        (ours if own else foreign).append(name)
    return ours, foreign


def prepare_out_dir(out: Path, prefix: str, resume: bool, overwrite: bool) -> None:
    """Refuse foreign files; refuse a previous conversion unless --resume/--overwrite says what to do."""
    ours, foreign = classify(out, prefix)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(
            f"--out '{out}' holds files the converter did not write ('{foreign[0]}'{more}); "
            "choose a new or empty directory"
        )
    if ours and not (resume or overwrite):
        raise UserError(
            f"--out '{out}' holds a previous conversion; pass --resume to continue it or --overwrite to replace it"
        )
    if ours and overwrite:
        for name in ours:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    # a read-only or full --out fails here, before the scan, not at the first shard: a real write
    # (os.access misses full disks and some mounts), left to the caller's OSError handling
    try:
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe.", dir=out)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(out)) from None
    os.close(fd)
    os.unlink(probe)


class RunState:
    """``<out>/.convert-state``: plan record and per-shard done records (see module docstring)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.dir = self.out / STATE_DIR

    # -- plan ----------------------------------------------------------------------------------
    def read_plan(self) -> dict | None:
        p = self.dir / "plan.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def write_plan(self, record: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _replace(self.dir / "plan.json", json.dumps(record, sort_keys=True, default=str).encode())

    # -- per shard (written by the worker that built the shard) ---------------------------------
    def commit(self, name: str, record: dict, stats_arrays: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **stats_arrays)
        _replace(self.dir / f"{name}.stats.npz", buf.getvalue())
        _replace(self.dir / f"{name}.done.json", json.dumps(record, sort_keys=True).encode())

    def done(self, name: str) -> dict | None:
        try:
            return json.loads((self.dir / f"{name}.done.json").read_text())
        except (OSError, ValueError):
            return None

    def load_stats(self, name: str) -> dict:
        with np.load(self.dir / f"{name}.stats.npz") as z:
            return {k: z[k] for k in z.files}

    def forget(self, name: str) -> None:
        for suffix in (".done.json", ".stats.npz"):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / f"{name}{suffix}").unlink()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def chunk_dir(out: Path) -> Path:
    """Where planned shards are built before ``shards.repack`` rewrites them into full shards."""
    return Path(out) / STATE_DIR / "chunks"


def _replace(path: Path, data: bytes) -> None:
    """Temp file + rename, deliberately without fsync: an fsync here makes the file system commit
    its journal, which on ext4 waits for the write-back of the shards written so far (measured on
    the 2-core VM, together with dropping the per-shard directory fsync: 2.26 s -> 1.42 s for a
    40-file 1-worker run). Losing a record to a power cut only means that --resume rebuilds the
    shard; a record whose shard bytes were lost fails the checksum."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def remove_temps(out: Path) -> None:
    """Delete ``.tmp-*`` leftovers of interrupted writes (in the output, state and chunk directories)."""
    for d in (out, out / STATE_DIR, chunk_dir(out)):
        if d.is_dir():
            for name in os.listdir(d):
                if name.startswith(TMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        (d / name).unlink()


def remove_unplanned_shards(out: Path, prefix: str, keep: set[str]) -> None:
    """Delete shard files not in ``keep`` (unfinished or stale ones from an interrupted run)."""
    pat = _shard_re(prefix)
    for name in os.listdir(out):
        if pat.fullmatch(name) and name not in keep:
            (out / name).unlink()
