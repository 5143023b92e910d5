"""Worker side: build one planned shard (read -> chip -> filter -> stats -> tar), or re-check a
finished one on resume. Functions here run in pool processes; they get everything they need as
arguments (picklable dataclasses) and keep only one open raster handle per process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from shards.boxes import sample_key_meta, sample_windows
from shards.chips import invalid_fraction, pad_value_for, place
from shards.inputs import label_names, load_sidecar, not_regular
from shards.manifest import json_number
from shards.plan import ShardTask
from shards.raster import (
    DatasetCache,
    SourceInfo,
    read_rows,
    read_window,
    reading_env,
    resampling_method,
    scan_source,
    window_transform,
)
from shards.state import RunState, chunk_dir
from shards.stats import BandStats
from shards.workers import note, tick
from shards.writer import ShardWriter, file_sha256

log = logging.getLogger(__name__)
_CACHE = DatasetCache()


@dataclass
class ShardResult:
    """What a finished shard reports (also its done record)."""

    index: int
    name: str
    digest: str
    count: int = 0
    bytes: int = 0
    sha256: str = ""
    files: int = 0
    dropped: int = 0
    read_bytes: int = 0
    skipped: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    kept: bool = False
    offsets: list = field(default_factory=list)  # sample starts + end of data (writer.offsets)
    first: dict | None = None  # band_names/nodata/dtype of the first written source
    zeros: list = field(default_factory=list)  # [source, pixels, zeros per band] where nodata is undeclared


def worker_init() -> None:
    """Pool initializer: a forked worker drops any raster handle inherited from the parent (signals
    are the pool's business, see shards/workers.py)."""
    _CACHE.close()


def close_rasters() -> None:
    """Close this process's raster handle (after an in-process run)."""
    _CACHE.close()


def scan_one(job: tuple, opts) -> tuple[int, object]:
    """(index, path, relpath, bands) -> (index, SourceInfo) or (index, reason string) for
    skipped.jsonl; ``bands`` is a --band-files scene's {band: files}, else None."""
    index, path, relpath, bands = job
    for p, rel in [pr for cands in bands.values() for pr in cands] if bands else [(path, None)]:
        odd = not_regular(p)
        if odd:  # GDAL would block forever opening a FIFO, or read a device without end
            return index, odd if rel is None else f"'{rel}': {odd}"
    try:
        if bands:
            from shards.band_stack import scan_scene

            with reading_env():
                return index, scan_scene(index, relpath, bands, opts)
        sidecar = load_sidecar(path) if opts.sidecars else None
        with reading_env():
            return index, scan_source(index, path, relpath, opts, sidecar)
    except Exception as e:  # noqa: BLE001 - anything GDAL or the band selection rejects is a skip, not a crash
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return index, f"{e.__class__.__name__}: {msg}" if msg else e.__class__.__name__


def iter_chips(ds, info: SourceInfo, windows: list, opts) -> Iterator[tuple[tuple, np.ndarray, int]]:
    """(window, chip (C, H, W) C-contiguous, padded pixels) for windows of one image, in order.

    Without --resize, each run of windows on the same rows is one strip read and chips are slices
    of it; with it, each window is its own resampled read.
    """
    if opts.resize is not None:
        method = resampling_method(opts.resampling)
        for win in windows:
            chip, pad = read_window(ds, info, win, opts.resize, method)
            yield win, chip, pad
        return
    fill = pad_value_for(info.dtype, info.nodata)
    i = 0
    while i < len(windows):
        j = i
        while j < len(windows) and windows[j][1] == windows[i][1] and windows[j][3] == windows[i][3]:
            j += 1
        row, h = windows[i][1], windows[i][3]
        c0 = windows[i][0]
        c1 = min(max(w[0] + w[2] for w in windows[i:j]), info.width)
        strip = read_rows(ds, info, row, h, c0, c1 - c0)
        for win in windows[i:j]:
            col, _, w, _ = win
            part = strip[:, :, col - c0 : col - c0 + w]
            if part.shape[1:] != (h, w):
                chip = place(part, (h, w), (0, 0), fill)
                pad = h * w - part.shape[1] * part.shape[2]
            else:
                chip, pad = np.ascontiguousarray(part), 0
            yield win, chip, pad
        i = j


def _meta(info: SourceInfo, win, out_hw) -> dict:
    m = dict(info.extra)
    gsd = info.gsd
    if gsd is not None and out_hw is not None:
        gsd = gsd * win[2] / out_hw[1]
    m.update(
        {
            "source": info.relpath,
            "window": list(win),
            "crs": info.crs,
            "transform": window_transform(info, win, out_hw),
            "band_names": list(info.band_names),
            "nodata": json_number(info.nodata),
            "dtype": info.dtype,
            "gsd": gsd,
            "timestamp": info.timestamp,
            "label": info.label,
        }
    )
    names = label_names(info.label)
    if len(names) > 1:  # multi-label CSV cell: "label" keeps the cell string, "labels" the names
        m["labels"] = names
    return m


def build_shard(task: ShardTask, opts, dead: dict | None = None) -> ShardResult:
    """Write ``task`` as ``<out>/<name>``, commit its stats + done record, return the result.
    ``dead``: {task index: {source relpath: reason}}, inputs that killed a worker building this
    shard before; they are recorded as skipped and not read again."""
    with reading_env():
        return _build(task, opts, (dead or {}).get(task.index, {}))


def _build(task: ShardTask, opts, dead: dict) -> ShardResult:
    out = Path(opts.out)
    res = ShardResult(index=task.index, name=task.name, digest=task.digest)
    first = task.segments[0].source
    stats = BandStats(len(first.indexes), first.dtype)
    labels = set()
    # without --fsync a shard torn by a power cut fails its checksum on --resume and is rebuilt
    with ShardWriter(task_dir(task, out), task.name, fsync=opts.fsync, size_hint=task.est_bytes) as writer:
        for seg in task.segments:
            info = seg.source
            if info.relpath in dead:
                res.skipped.append({"source": info.relpath, "reason": dead[info.relpath]})
                continue
            windows = sample_windows(info, opts)[seg.start : seg.stop]
            fill = pad_value_for(info.dtype, info.nodata)
            note(info.relpath)  # a worker that dies from here on is blamed on this input
            chips = _read_chips(info, windows, opts)
            written = pixels = 0
            zeros = stats.zero_counts() if info.nodata is None else None
            for done, got in enumerate(chips):
                tick()  # a long input is not a hung one (the pool's --stall-timeout)
                if isinstance(got, _Failed):  # this input fails from window ``done`` on: record, go on
                    at = f" at window {list(windows[done])}" if done < len(windows) else ""
                    kept = f"; {written} earlier window(s) of it kept" if written else ""
                    res.skipped.append({"source": info.relpath, "reason": f"{got.head}{at}{got.tail}{kept}"})
                    break
                win, chip, pad = got
                res.read_bytes += chip.nbytes
                if opts.max_nodata < 1.0 and invalid_fraction(chip, info.nodata, pad) > opts.max_nodata:
                    res.dropped += 1
                    continue
                # stats and the written samples move together: a write error ends the whole shard
                key, meta = sample_key_meta(info, seg.start + done, win, opts, _meta(info, win, opts.resize))
                adder = stats.band_adder(info.nodata, pad, fill)
                if adder is None:
                    stats.add(chip, info.nodata, pad, fill)
                writer.write(key, chip, meta, visit=adder)
                written += 1
                pixels += chip.shape[1] * chip.shape[2] - pad
                if res.first is None:
                    res.first = {"band_names": list(info.band_names), "nodata": info.nodata, "dtype": info.dtype}
                if info.label is not None:
                    labels.add(info.label)
            else:
                res.files += 1
            if zeros is not None and pixels:
                res.zeros.append([info.relpath, pixels, (stats.zero_counts() - zeros).tolist()])
        note(None)
    res.count, res.bytes, res.sha256, res.offsets = writer.count, writer.bytes, writer.sha256 or "", writer.offsets
    res.labels = sorted(labels)
    RunState(out).commit(task.name, asdict(res), stats.to_arrays())
    return res


@dataclass
class _Failed:
    """Why an input's remaining windows cannot be used: ``head + " at window [..]" + tail``."""

    head: str
    tail: str


def _read_chips(info: SourceInfo, windows: list, opts) -> Iterator:
    """iter_chips of one input, but a failure ends it with a :class:`_Failed` instead of raising:
    unreadable pixels (truncated file, I/O error) and +-inf pixels skip the rest of the input, never
    the shard. Only reads happen here, so a write error (disk full) still propagates."""
    try:
        for win, chip, pad in iter_chips(_CACHE.get(info, opts.resampling), info, windows, opts):
            if chip.dtype.kind == "f" and np.isinf(chip).any():
                # inf is not a value the statistics or a model can use (NaN counts as nodata)
                yield _Failed(
                    "+-inf pixel values", ": not usable as data; set them to NaN or the nodata value in the source"
                )
                return
            yield win, chip, pad
    except Exception as e:  # noqa: BLE001 - any read failure is the chip's skip reason, not a crash
        _CACHE.close()
        yield _Failed("read failed", f": {e.__class__.__name__}: {e}")


def task_dir(task: ShardTask, out: Path) -> Path:
    """Where a planned shard is written: ``--out``, or the run state's chunk folder when the
    shards are repacked after the nodata filter (``ShardTask.chunk``)."""
    return chunk_dir(out) if task.chunk else out


def check_kept(name: str, digest: str, shard_dir: str, out_dir: str) -> ShardResult | None:
    """Resume: the done record of ``name`` if it belongs to this plan and the shard's bytes (in
    ``shard_dir``, see ``task_dir``) still hash to it (and its stats load); None means rebuild it."""
    state = RunState(Path(out_dir))
    rec = state.done(name)
    path = Path(shard_dir) / name
    if rec is None or rec.get("digest") != digest or not path.is_file():
        return None
    try:
        if os.path.getsize(path) != rec["bytes"] or file_sha256(path) != rec["sha256"]:
            log.warning("%s does not match its checksum; rebuilding it", name)
            return None
        state.load_stats(name)
    except (OSError, ValueError, KeyError):
        return None
    res = ShardResult(**{k: v for k, v in rec.items() if k in ShardResult.__dataclass_fields__})
    res.kept = True
    return res
