"""Full shards after the nodata filter: cut built chunks into shards of ``--max-samples-per-shard``.

A chunk is a planned shard built with ``--max-nodata`` below 1 (``plan.repacked``), which drops
chips the plan could not foresee. Its done record lists each sample's byte offset
(``ShardWriter.offsets``), so the samples of all chunks, in plan order, can be re-cut without
parsing or re-encoding anything: every shard takes the next ``--max-samples-per-shard`` samples
(fewer only when ``--max-shard-bytes`` would be exceeded, and in the last shard), its bytes are the
chunks' sample bytes copied as they are, then the tar end blocks. The result equals what writing
those samples one by one would give, and depends only on the chunks, so a single run and a merge of
``--part`` runs cut identical shards. Each shard is written to a temp name and renamed when complete.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shards.plan import shard_name
from shards.workers import tick
from shards.writer import ShardWriter


@dataclass
class Piece:
    """Bytes ``[start, stop)`` of chunk file ``path`` holding ``samples`` whole samples."""

    path: str
    start: int
    stop: int
    samples: int


@dataclass
class RepackTask:
    index: int
    name: str
    pieces: list[Piece] = field(default_factory=list)
    count: int = 0
    data_bytes: int = 0


def plan_repack(chunks: Sequence[tuple[str, dict]], prefix: str, max_samples: int, max_bytes: int) -> list[RepackTask]:
    """chunks: (file path, done record with ``offsets``) in plan order -> the shards to write."""
    tasks: list[RepackTask] = []
    cur = None
    for path, rec in chunks:
        offs = rec["offsets"]
        for i in range(len(offs) - 1):
            size = offs[i + 1] - offs[i]
            if cur is None or cur.count >= max_samples or (cur.count and cur.data_bytes + size > max_bytes):
                cur = RepackTask(index=len(tasks), name=shard_name(prefix, len(tasks)))
                tasks.append(cur)
            last = cur.pieces[-1] if cur.pieces else None
            if last is not None and last.path == path and last.stop == offs[i]:
                last.stop, last.samples = offs[i + 1], last.samples + 1
            else:
                cur.pieces.append(Piece(path, offs[i], offs[i + 1], 1))
            cur.count += 1
            cur.data_bytes += size
    return tasks


def write_repacked(task: RepackTask, out_dir: str, fsync: bool) -> dict:
    """Write one shard of ``plan_repack`` -> its manifest row {name, count, bytes, sha256}."""
    with ShardWriter(out_dir, task.name, fsync=fsync, size_hint=task.data_bytes + 20480) as writer:
        for piece in task.pieces:
            tick()  # the pool's --stall-timeout counts only silence
            with open(piece.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                if len(mm) < piece.stop:
                    raise OSError(f"'{piece.path}' is shorter than its record ({len(mm)} < {piece.stop} bytes)")
                with memoryview(mm) as view:
                    writer.append(view[piece.start : piece.stop], piece.samples)
    return {"name": task.name, "count": writer.count, "bytes": writer.bytes, "sha256": writer.sha256}


def chunk_files(records: Sequence[dict], dirs: Sequence[str | os.PathLike]) -> list[tuple[str, dict]]:
    """Pair each chunk record with its file (``<dir>/<name>``), for ``plan_repack``."""
    return [(str(Path(d) / r["name"]), r) for d, r in zip(dirs, records)]
