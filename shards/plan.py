"""From scanned headers to a fixed shard plan.

Every sample's shard is decided here, before any pixel is read: files in input order, each one's
windows row-major (or its fMoW boxes), packed greedily into shards of at most
``--max-samples-per-shard`` samples and (estimated) ``--max-shard-bytes``. A shard is then one unit
of work for one worker, so the output is byte-identical for any ``--workers`` and a resumed run
rebuilds exactly the missing shards.

With ``--max-nodata`` below 1 the filter drops chips that the plan cannot foresee. The planned
shards are then *chunks*: built like shards into the run state, then cut into full shards after
the filter by ``shards.repack`` (every shard holds ``--max-samples-per-shard`` samples, the last one
the rest). ``--part K/N`` builds the contiguous range ``part_range`` of the same plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from shards.boxes import no_window_reason, sample_windows
from shards.raster import SourceInfo
from shards.writer import sample_bytes_estimate

log = logging.getLogger(__name__)


@dataclass
class Segment:
    """Windows ``[start, stop)`` (in ``boxes.sample_windows`` order) of one source."""

    source: SourceInfo
    start: int
    stop: int


@dataclass
class ShardTask:
    index: int
    name: str
    segments: list[Segment] = field(default_factory=list)
    planned: int = 0
    est_bytes: int = 0
    digest: str = ""
    chunk: bool = False  # built into the run state and repacked (see module docstring)


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def repacked(opts) -> bool:
    """Whether shards are cut after the nodata filter (``shards.repack``) instead of as planned."""
    return opts.max_nodata < 1.0


def part_range(num_tasks: int, part: tuple[int, int] | None) -> range:
    """The planned shards that ``--part K/N`` builds: the K-th of N contiguous, near-equal ranges."""
    if part is None:
        return range(num_tasks)
    k, n = part
    return range((k - 1) * num_tasks // n, k * num_tasks // n)


def filter_signature(sources: Sequence[SourceInfo]) -> tuple[list[SourceInfo], list[dict]]:
    """Keep the sources sharing the most common (bands out, dtype); ties go to the earliest file.
    The rest become skipped entries naming what differs."""
    if not sources:
        return [], []
    counts = Counter(s.signature for s in sources)
    first: dict[tuple[int, str], int] = {}
    for s in sources:
        first.setdefault(s.signature, s.index)
    ref = max(counts, key=lambda sig: (counts[sig], -first[sig]))
    keep, skipped = [], []
    for s in sources:
        if s.signature == ref:
            keep.append(s)
        else:
            what = f"{s.signature[0]} bands after selection" if s.signature[0] != ref[0] else f"dtype {s.signature[1]}"
            skipped.append(
                {
                    "source": s.relpath,
                    "reason": f"{what} does not match the rest of the archive "
                    f"({ref[0]} bands, {ref[1]}; {counts[ref]} files)",
                }
            )
    return keep, skipped


def sample_nbytes(src: SourceInfo, opts) -> tuple[int, int]:
    """(pixel bytes, estimated shard bytes) of one sample of ``src``."""
    import numpy as np

    h, w = opts.resize or opts.chip or (src.height, src.width)
    pix = len(src.indexes) * h * w * np.dtype(src.dtype).itemsize
    js = 600 + len(json.dumps(src.extra)) + 16 * len(src.indexes) + len(src.crs or "")
    return pix, sample_bytes_estimate(len(src.key) + 24, pix, json_bytes=js)


def make_plan(sources: Sequence[SourceInfo], opts, fingerprint: dict) -> tuple[list[ShardTask], list[dict]]:
    """-> (tasks in shard order, skipped entries for images that yield no window)."""
    tasks: list[ShardTask] = []
    skipped: list[dict] = []
    cur: ShardTask | None = None
    cur_bytes = 0
    chunk = repacked(opts) and opts.part is None  # a part's chunks are its shards; merge repacks them
    for src in sources:
        n = len(sample_windows(src, opts))
        if n == 0:
            skipped.append({"source": src.relpath, "reason": no_window_reason(src, opts)})
            continue
        _, per = sample_nbytes(src, opts)
        start = 0
        while start < n:
            if cur is None or cur.planned >= opts.max_samples or (cur.planned and cur_bytes + per > opts.max_bytes):
                cur = ShardTask(index=len(tasks), name=shard_name(opts.prefix, len(tasks)), chunk=chunk)
                tasks.append(cur)
                cur_bytes = 0
            room = opts.max_samples - cur.planned
            if cur.planned:
                room = min(room, max(0, (opts.max_bytes - cur_bytes) // per))
            take = max(1, min(n - start, room))
            cur.segments.append(Segment(src, start, start + take))
            cur.planned += take
            cur_bytes += take * per
            cur.est_bytes = cur_bytes
            start += take
    for t in tasks:
        t.digest = task_digest(t, fingerprint)
    return tasks, skipped


def task_digest(task: ShardTask, fingerprint: dict) -> str:
    """Identity of a shard's planned content: its sources, windows, keys, labels and settings (which
    ``--part`` builds it is no part of its content)."""
    settings = {k: v for k, v in fingerprint.items() if k != "part"}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for seg in task.segments:
        s = seg.source
        h.update(
            json.dumps(
                [
                    s.relpath,
                    s.key,
                    s.label,
                    seg.start,
                    seg.stop,
                    s.indexes,
                    s.width,
                    s.height,
                    s.dtype,
                    s.nodata,
                    s.band_paths,
                    s.extra,
                ],
                sort_keys=True,
                default=str,
            ).encode()
        )
    return h.hexdigest()


def plan_digest(tasks: Sequence[ShardTask]) -> str:
    h = hashlib.sha256()
    for t in tasks:
        h.update(f"{t.name}:{t.digest};".encode())
    return h.hexdigest()
