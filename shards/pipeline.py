"""One conversion, end to end: list -> scan headers -> plan shards -> build (or keep) -> manifest.

Parallelism is over whole shards (``--workers`` spawned processes, one raster handle each);
the main process only plans, collects small results and writes the manifest. Output does not
depend on the worker count. Interrupted (Ctrl-C, kill), the output directory holds finished
shards plus their done records and no partial file with a shard name; ``--resume`` keeps every
finished shard whose bytes still match its checksum and builds the rest.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from engine.errors import UserError
from engine.progress import progress
from shards.assemble import assemble, fold_stats, write_skipped
from shards.band_files import group_band_files, input_exts
from shards.build import ShardResult, build_shard, check_kept, close_rasters, scan_one, task_dir, worker_init
from shards.inputs import assign_keys, label_for, list_inputs, parse_label_spec
from shards.manifest import NAME as MANIFEST_NAME, read_manifest
from shards.options import ConvertOptions
from shards.parts import part_manifest_entry, write_part
from shards.plan import filter_signature, make_plan, part_range, plan_digest, repacked
from shards.state import SKIPPED, RunState, chunk_dir, prepare_out_dir, remove_temps, remove_unplanned_shards

log = logging.getLogger(__name__)


@dataclass
class Summary:
    files: int
    chips: int
    shards: int
    kept: int
    skipped: int
    dropped: int
    read_bytes: int
    written_bytes: int
    seconds: float
    manifest: Optional[dict] = None
    already_complete: bool = False

    @property
    def mb_per_s(self) -> float:
        return self.read_bytes / 1e6 / max(self.seconds, 1e-9)

    def line(self) -> str:
        if self.already_complete:
            return f"done: already complete, {self.chips} samples in {self.shards} shards; nothing to do"
        kept = f" ({self.kept} kept from the interrupted run)" if self.kept else ""
        dropped = f", {self.dropped} chips dropped (--max-nodata)" if self.dropped else ""
        return (f"done: {self.files} files -> {self.chips} chips in {self.shards} shards{kept}, "
                f"{self.skipped} skipped{dropped}; read {self.read_bytes / 1e6:.1f} MB in "
                f"{self.seconds:.1f} s = {self.mb_per_s:.1f} MB/s")


def _context():
    """fork where it is safe (no other Python threads; the parent holds no open raster, see
    worker_init): workers start in milliseconds instead of re-importing numpy and rasterio
    (~1 s each on a loaded 2-core machine). Otherwise spawn."""
    if "fork" in mp.get_all_start_methods() and threading.active_count() == 1:
        return mp.get_context("fork")
    return mp.get_context("spawn")


class _Runner:
    """map/imap over the pool, or in-process when --workers 1 (no pickling, easy debugging)."""

    def __init__(self, workers: int):
        self.pool = _context().Pool(workers, initializer=worker_init) if workers > 1 else None

    def imap(self, fn, items, ordered=True, chunksize=1):
        if self.pool is None:
            return map(fn, items)
        method = self.pool.imap if ordered else self.pool.imap_unordered
        return method(fn, items, chunksize=chunksize)

    def close(self, abort: bool) -> None:
        if self.pool is not None:
            self.pool.terminate() if abort else self.pool.close()
            self.pool.join()


def convert(opts: ConvertOptions, on_shard: Optional[Callable[[ShardResult], None]] = None) -> Summary:
    """Run one conversion (see module docstring). ``on_shard`` is called in the main process
    after each shard is finished (tests use it to interrupt a run at a known point)."""
    t0 = time.monotonic()
    out = Path(opts.out)
    fingerprint = opts.fingerprint()
    files = list_inputs(opts.inputs, input_exts(opts), opts.root, exclude=str(out))
    label_kind, label_arg = parse_label_spec(opts.labels)
    prepare_out_dir(out, opts.prefix, opts.resume, opts.overwrite)
    state = RunState(out)
    if opts.resume:
        done = _already_complete(out, state, fingerprint, t0)
        if done is not None:
            return done
    runner = _Runner(opts.workers)
    try:
        summary = _run(opts, files, label_kind, label_arg, fingerprint, out, state, runner, on_shard, t0)
    except BaseException:
        runner.close(abort=True)
        remove_temps(out)
        raise
    finally:
        close_rasters()
    runner.close(abort=False)
    return summary


def _already_complete(out: Path, state: RunState, fingerprint: dict, t0: float) -> Optional[Summary]:
    """--resume on a finished conversion: nothing to do when the settings match."""
    if state.dir.exists() or not (out / MANIFEST_NAME).exists():
        return None
    m = read_manifest(out, "--resume")
    prev = dict(m["converter"]["args"])
    prev.pop("workers", None)
    if prev != fingerprint:
        raise UserError(f"--resume: '{out}' holds a finished conversion made with other settings "
                        f"({_diff(prev, fingerprint)}); use --overwrite or another --out")
    log.info("'%s' is already complete; run 'geoexplora-convert verify %s' to check it", out, out)
    return Summary(files=0, chips=m["total_samples"], shards=len(m["shards"]), kept=len(m["shards"]),
                   skipped=0, dropped=0, read_bytes=0, written_bytes=0, seconds=time.monotonic() - t0, manifest=m,
                   already_complete=True)


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "differs: " + ", ".join(keys) if keys else "same settings"


def _strict_fail(entry: dict) -> UserError:
    return UserError(f"input '{entry['source']}': {entry['reason']} (--strict stops at the first bad input)")


def _run(opts, files, label_kind, label_arg, fingerprint, out, state, runner, on_shard, t0) -> Summary:
    skipped: list[dict] = []
    if opts.band_files is not None:  # one file per band: each scene becomes one input
        files, skipped = group_band_files(files, opts)
    keys = assign_keys([f.relpath for f in files])
    jobs = [(i, f.path, f.relpath, f.bands) for i, f in enumerate(files)]
    chunk = max(1, min(64, len(jobs) // (8 * opts.workers)))
    sources = []
    scan = runner.imap(functools.partial(scan_one, opts=opts), jobs, chunksize=chunk)
    for index, got in progress(scan, total=len(jobs), desc="scan", unit="file"):
        if isinstance(got, str):
            entry = {"source": files[index].relpath, "reason": got}
            if opts.strict:
                raise _strict_fail(entry)
            skipped.append(entry)
            continue
        got.key = keys[index]
        got.label = label_for(files[index], label_kind, label_arg)
        sources.append(got)
    sources, mismatched = filter_signature(sources)
    skipped += mismatched
    if label_kind == "csv":
        missing = [s.relpath for s in sources if s.label is None]
        if missing:
            log.warning("%d file(s) have no row in the labels CSV (e.g. '%s'); their label is null",
                        len(missing), missing[0])
    tasks, windowless = make_plan(sources, opts, fingerprint)
    skipped += windowless
    if opts.strict and skipped:
        raise _strict_fail(skipped[0])
    if not tasks:
        write_skipped(out, skipped)
        raise UserError(f"input: nothing to convert, all {len(files)} file(s) were skipped; "
                        f"see '{out / SKIPPED}'")

    prev = state.read_plan() if opts.resume else None
    if prev is not None and prev.get("fingerprint") != fingerprint:
        raise UserError(f"--resume: settings differ from the interrupted run ({_diff(prev['fingerprint'], fingerprint)}); "
                        "rerun with the original arguments or use --overwrite")
    if not opts.resume:
        state.remove()
    state.write_plan({"fingerprint": fingerprint, "plan": plan_digest(tasks), "shards": len(tasks)})
    remove_temps(out)

    mine = [tasks[i] for i in part_range(len(tasks), opts.part)]  # all of them, or this --part's range
    results: dict[int, ShardResult] = {}
    if opts.resume:
        check = runner.imap(functools.partial(_check, out_dir=str(out)),
                            [(t.name, t.digest, str(task_dir(t, out))) for t in mine])
        for t, res in zip(mine, progress(check, total=len(mine), desc="check finished shards", unit="shard")):
            if res is not None:
                results[t.index] = res
        log.info("resume: keeping %d of %d shards", len(results), len(mine))
    for t in mine:
        if t.index not in results:
            state.forget(t.name)
    keep = {tasks[i].name for i in results}
    chunked = any(t.chunk for t in tasks)
    remove_unplanned_shards(out, opts.prefix, set() if chunked else keep)  # repacked shards are cut anew
    if chunked:
        chunk_dir(out).mkdir(parents=True, exist_ok=True)
        remove_unplanned_shards(chunk_dir(out), opts.prefix, keep)
    _check_strict(opts, results.values())

    todo = [t for t in mine if t.index not in results]
    read = 0
    t_build = time.monotonic()
    bar = progress(total=len(todo), desc="convert", unit="shard")
    for res in runner.imap(functools.partial(build_shard, opts=opts), todo, ordered=False):
        results[res.index] = res
        read += res.read_bytes
        bar.update(1)
        bar.set_postfix_str(f"{read / 1e6 / max(time.monotonic() - t_build, 1e-9):.0f} MB/s")
        _check_strict(opts, [res])
        if on_shard is not None:
            on_shard(res)
    bar.close()
    return _finish(opts, tasks, mine, sources, results, skipped, fingerprint, label_kind, out, state, t0, runner)


def _check(item, out_dir):
    return check_kept(item[0], item[1], item[2], out_dir)


def _check_strict(opts, results) -> None:
    if opts.strict:
        for r in results:
            if r.skipped:
                raise _strict_fail(r.skipped[0])


def _finish(opts, tasks, mine, sources, results, skipped, fingerprint, label_kind, out, state, t0,
            runner) -> Summary:
    ordered = [results[t.index] for t in mine]
    records = [asdict(r) for r in ordered]
    failed = {e["source"] for r in ordered for e in r.skipped}
    _warn_mixed(sources, failed)
    ref = sources[0]
    fallback = {"band_names": list(ref.band_names), "nodata": ref.nodata, "dtype": ref.dtype}
    args = dict(fingerprint, workers=opts.workers)

    def load(i: int) -> dict:
        return state.load_stats(ordered[i].name)

    stats = fold_stats(records, load, len(ref.indexes), ref.dtype)  # plan order: float stats identical on every run
    if opts.part is not None:
        write_part(out, opts.part, args, plan_digest(tasks), len(tasks), records, load, stats, skipped, fallback)
        manifest = assemble(out, records, stats, skipped, args, label_kind != "none", "built", [], fallback, opts,
                            extra=part_manifest_entry(opts.part, len(tasks)), allow_empty=True)
    else:
        how = "repack" if repacked(opts) else "built"
        manifest = assemble(out, records, stats, skipped, args, label_kind != "none", how,
                            [task_dir(t, out) for t in mine], fallback, opts, imap=runner.imap)
    state.remove()
    planned = {seg.source.relpath for t in mine for seg in t.segments}
    built = [r for r in ordered if not r.kept]
    all_skipped = len(skipped) + sum(len(r.skipped) for r in ordered)
    summary = Summary(files=len(planned - failed), chips=manifest["total_samples"], shards=len(manifest["shards"]),
                      kept=len(ordered) - len(built), skipped=all_skipped, dropped=sum(r.dropped for r in ordered),
                      read_bytes=sum(r.read_bytes for r in built), written_bytes=sum(r.bytes for r in built),
                      seconds=time.monotonic() - t0, manifest=manifest)
    if all_skipped:
        log.warning("%d input(s) skipped; reasons in '%s'", all_skipped, out / SKIPPED)
    return summary


def _warn_mixed(sources, failed: set) -> None:
    written = [s for s in sources if s.relpath not in failed] or list(sources)
    ref = written[0]
    for attr in ("band_names", "nodata"):
        odd = [s.relpath for s in written if getattr(s, attr) != getattr(ref, attr)
               and not (attr == "nodata" and s.nodata != s.nodata and ref.nodata != ref.nodata)]
        if odd:
            log.warning("%d file(s) have other %s than '%s' (e.g. '%s'); the manifest lists the first file's, "
                        "each sample's json its own", len(odd), attr, ref.relpath, odd[0])
