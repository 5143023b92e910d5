"""One conversion, end to end: list -> scan headers -> plan shards -> build (or keep) -> manifest.

Parallelism is over whole shards (``--workers`` processes, one raster handle each, see
shards/workers.py); the main process only plans, collects small results and writes the manifest.
Output does not depend on the worker count. Interrupted (Ctrl-C, kill), the output directory holds
finished shards plus their done records and no partial file with a shard name; ``--resume`` keeps
every finished shard whose bytes still match its checksum and builds the rest.

An input whose reading kills a worker (a GDAL segfault, the OOM killer) is recorded in
skipped.jsonl like any unreadable input; its shard is rebuilt without it and the run goes on.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.errors import UserError
from engine.progress import progress
from shards.assemble import assemble, fold_stats
from shards.band_files import group_band_files, input_exts
from shards.build import ShardResult, build_shard, check_kept, close_rasters, scan_one, task_dir, worker_init
from shards.inputs import assign_keys, label_for, list_inputs, parse_label_spec
from shards.manifest import NAME as MANIFEST_NAME
from shards.manifest import read_manifest
from shards.options import ConvertOptions
from shards.parts import part_manifest_entry, write_part
from shards.plan import filter_signature, make_plan, part_range, plan_digest, repacked
from shards.skips import summary_lines as skip_lines
from shards.skips import write_skipped
from shards.state import SKIPPED, RunState, chunk_dir, prepare_out_dir, remove_temps, remove_unplanned_shards
from shards.workers import Crash, WorkerCrashed, WorkerPool

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
    manifest: dict | None = None
    already_complete: bool = False

    @property
    def mb_per_s(self) -> float:
        return self.read_bytes / 1e6 / max(self.seconds, 1e-9)

    def line(self) -> str:
        if self.already_complete:
            return f"done: already complete, {self.chips} samples in {self.shards} shards; nothing to do"
        kept = f" ({self.kept} kept from the interrupted run)" if self.kept else ""
        dropped = f", {self.dropped} chips dropped (--max-nodata)" if self.dropped else ""
        return (
            f"done: {self.files} files -> {self.chips} chips in {self.shards} shards{kept}, "
            f"{self.skipped} skipped{dropped}; read {self.read_bytes / 1e6:.1f} MB in "
            f"{self.seconds:.1f} s = {self.mb_per_s:.1f} MB/s"
        )


def convert(opts: ConvertOptions, on_shard: Callable[[ShardResult], None] | None = None) -> Summary:
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
    pool = WorkerPool(opts.workers, initializer=worker_init, stall_s=opts.stall_timeout)
    try:
        summary = _run(opts, files, label_kind, label_arg, fingerprint, out, state, pool, on_shard, t0)
    except BaseException:
        pool.close(abort=True)
        remove_temps(out)
        raise
    finally:
        close_rasters()
    pool.close()
    return summary


def _already_complete(out: Path, state: RunState, fingerprint: dict, t0: float) -> Summary | None:
    """--resume on a finished conversion: nothing to do when the settings match."""
    if state.dir.exists() or not (out / MANIFEST_NAME).exists():
        return None
    m = read_manifest(out, "--resume")
    prev = dict(m["converter"]["args"])
    prev.pop("workers", None)
    if prev != fingerprint:
        raise UserError(
            f"--resume: '{out}' holds a finished conversion made with other settings "
            f"({_diff(prev, fingerprint)}); use --overwrite or another --out"
        )
    log.info("'%s' is already complete; run 'geoexplora-convert verify %s' to check it", out, out)
    return Summary(
        files=0,
        chips=m["total_samples"],
        shards=len(m["shards"]),
        kept=len(m["shards"]),
        skipped=0,
        dropped=0,
        read_bytes=0,
        written_bytes=0,
        seconds=time.monotonic() - t0,
        manifest=m,
        already_complete=True,
    )


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "differs: " + ", ".join(keys) if keys else "same settings"


def _strict_fail(entry: dict) -> UserError:
    return UserError(f"input '{entry['source']}': {entry['reason']} (--strict stops at the first bad input)")


def _all_skipped(out: Path, skipped: list[dict], what: str) -> UserError:
    """Write skipped.jsonl, log a line per kind of reason, and the one-line error to raise."""
    write_skipped(out, skipped)
    for line in skip_lines(skipped):
        log.warning("skipped: %s", line)
    first = f"; first: '{skipped[0]['source']}': {skipped[0]['reason']}" if skipped else ""
    return UserError(f"input: {what}{first}; see '{out / SKIPPED}'")


def _crash_reason(crash: Crash, doing: str) -> str:
    return f"the converter worker {doing} {crash.how()}"


def _run(opts, files, label_kind, label_arg, fingerprint, out, state, pool, on_shard, t0) -> Summary:
    skipped: list[dict] = []
    if opts.band_files is not None:  # one file per band: each scene becomes one input
        files, skipped = group_band_files(files, opts)
    keys = assign_keys([f.relpath for f in files])
    jobs = [(i, f.path, f.relpath, f.bands) for i, f in enumerate(files)]
    chunk = max(1, min(64, len(jobs) // (8 * opts.workers)))
    sources = []
    scanned: list = [None] * len(jobs)
    bar = progress(total=len(jobs), desc="scan", unit="file")
    for i, got in pool.run(functools.partial(scan_one, opts=opts), jobs, chunk=chunk):
        scanned[i] = got if not isinstance(got, Crash) else (i, _crash_reason(got, "reading its header"))
        bar.update(1)
    bar.close()
    for index, got in scanned:  # input order, whatever order the workers finished in
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
            log.warning(
                "%d file(s) have no row in the labels CSV (e.g. '%s'); their label is null", len(missing), missing[0]
            )
    tasks, windowless = make_plan(sources, opts, fingerprint)
    skipped += windowless
    if opts.strict and skipped:
        raise _strict_fail(skipped[0])
    if not tasks:
        raise _all_skipped(out, skipped, f"nothing to convert, all {len(files)} file(s) were skipped")

    prev = state.read_plan() if opts.resume else None
    if prev is not None and prev.get("fingerprint") != fingerprint:
        raise UserError(
            f"--resume: settings differ from the interrupted run ({_diff(prev['fingerprint'], fingerprint)}); "
            "rerun with the original arguments or use --overwrite"
        )
    if not opts.resume:
        state.remove()
    state.write_plan({"fingerprint": fingerprint, "plan": plan_digest(tasks), "shards": len(tasks)})
    remove_temps(out)

    mine = [tasks[i] for i in part_range(len(tasks), opts.part)]  # all of them, or this --part's range
    results: dict[int, ShardResult] = {}
    if opts.resume:
        check = pool.run(
            functools.partial(_check, out_dir=str(out)), [(t.name, t.digest, str(task_dir(t, out))) for t in mine]
        )
        for i, res in progress(check, total=len(mine), desc="check finished shards", unit="shard"):
            if res is not None and not isinstance(res, Crash):  # a crash while hashing: rebuild it
                results[mine[i].index] = res
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
    dead: dict[int, dict[str, str]] = {}  # task index -> {input: reason} of inputs that killed a worker
    while todo:  # a shard whose worker died is built again without the input it was reading
        retry = []
        for i, res in pool.run(functools.partial(build_shard, opts=opts, dead=dead), todo):
            if isinstance(res, Crash):
                retry.append(todo[i])
                _blame(todo[i], res, dead, opts)
                continue
            results[res.index] = res
            read += res.read_bytes
            bar.update(1)
            bar.set_postfix_str(f"{read / 1e6 / max(time.monotonic() - t_build, 1e-9):.0f} MB/s")
            _check_strict(opts, [res])
            if on_shard is not None:
                on_shard(res)
        todo = retry
    bar.close()
    return _finish(opts, tasks, mine, sources, results, skipped, fingerprint, label_kind, out, state, t0, pool)


def _blame(task, crash: Crash, dead: dict, opts) -> None:
    """Record the input a worker died reading; a death outside any input read stops the run."""
    seen = dead.setdefault(task.index, {})
    if crash.note is None or crash.note in seen:
        raise WorkerCrashed(
            f"a converter worker {crash.how()} while building {task.name}, not while reading "
            "an input; rerun with --resume (finished shards are kept)"
        )
    seen[crash.note] = _crash_reason(crash, "reading it")
    if opts.strict:
        raise _strict_fail({"source": crash.note, "reason": seen[crash.note]})
    log.warning(
        "'%s': the worker reading it %s; skipping it, rebuilding %s without it", crash.note, crash.how(), task.name
    )


def _check(item, out_dir):
    return check_kept(item[0], item[1], item[2], out_dir)


def _check_strict(opts, results) -> None:
    if opts.strict:
        for r in results:
            if r.skipped:
                raise _strict_fail(r.skipped[0])


def _finish(opts, tasks, mine, sources, results, skipped, fingerprint, label_kind, out, state, t0, pool) -> Summary:
    ordered = [results[t.index] for t in mine]
    records = [asdict(r) for r in ordered]
    failed = {e["source"] for r in ordered for e in r.skipped}
    _warn_mixed(sources, failed)
    if opts.part is None and sum(r.count for r in ordered) == 0:
        raise _all_skipped(
            out,
            sorted(skipped + [e for r in ordered for e in r.skipped], key=lambda e: e["source"]),
            "no sample passed the filters (every chip exceeded --max-nodata or every file was "
            "skipped; raise --max-nodata?)",
        )
    ref = sources[0]
    fallback = {"band_names": list(ref.band_names), "nodata": ref.nodata, "dtype": ref.dtype}

    def load(i: int) -> dict:
        return state.load_stats(ordered[i].name)

    stats = fold_stats(records, load, len(ref.indexes), ref.dtype)  # plan order: float stats identical on every run
    remove_temps(out)  # a worker that died mid-shard left its temp file
    # manifest args: only the settings that decide the output (a --resume with other --workers
    # writes the same file)
    if opts.part is not None:
        write_part(out, opts.part, fingerprint, plan_digest(tasks), len(tasks), records, load, stats, skipped, fallback)
        how, dirs, extra = "built", [], part_manifest_entry(opts.part, len(tasks))
    else:
        how = "repack" if repacked(opts) else "built"
        dirs, extra = [task_dir(t, out) for t in mine], None
    manifest = assemble(
        out,
        records,
        stats,
        skipped,
        fingerprint,
        label_kind != "none",
        how,
        dirs,
        fallback,
        opts,
        imap=_Ordered(pool),
        extra=extra,
    )
    state.remove()
    planned = {seg.source.relpath for t in mine for seg in t.segments}
    built = [r for r in ordered if not r.kept]
    all_skipped = sorted(skipped + [e for r in ordered for e in r.skipped], key=lambda e: e["source"])
    summary = Summary(
        files=len(planned - failed),
        chips=manifest["total_samples"],
        shards=len(manifest["shards"]),
        kept=len(ordered) - len(built),
        skipped=len(all_skipped),
        dropped=sum(r.dropped for r in ordered),
        read_bytes=sum(r.read_bytes for r in built),
        written_bytes=sum(r.bytes for r in built),
        seconds=time.monotonic() - t0,
        manifest=manifest,
    )
    if all_skipped:
        log.warning("%d input(s) skipped; reasons in '%s':", len(all_skipped), out / SKIPPED)
        for line in skip_lines(all_skipped):
            log.warning("  %s", line)
    return summary


class _Ordered:
    """``map(fn, items)`` over the worker pool, results in item order (shards.repack's cutting)."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool

    def __call__(self, fn, items) -> list:
        items = list(items)
        out: list = [None] * len(items)
        for i, res in self.pool.run(fn, items):
            if isinstance(res, Crash):
                raise WorkerCrashed(
                    f"a converter worker {res.how()} while cutting shards; rerun with --resume "
                    "(the built shards are kept)"
                )
            out[i] = res
        return out


def _warn_mixed(sources, failed: set) -> None:
    written = [s for s in sources if s.relpath not in failed] or list(sources)
    ref = written[0]
    for attr in ("band_names", "nodata"):
        odd = [
            s.relpath
            for s in written
            if getattr(s, attr) != getattr(ref, attr)
            and not (attr == "nodata" and s.nodata != s.nodata and ref.nodata != ref.nodata)
        ]
        if odd:
            log.warning(
                "%d file(s) have other %s than '%s' (e.g. '%s'); the manifest lists the first file's, "
                "each sample's json its own",
                len(odd),
                attr,
                ref.relpath,
                odd[0],
            )
