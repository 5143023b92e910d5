"""From finished planned shards to the archive: shard files, skipped.jsonl, manifest.json.

One function for a single run and for ``geoexplora-convert merge``, so that both write the same
bytes from the same planned shards ("records": done records in plan order, ``build.ShardResult``
as dicts). Everything in the manifest is a function of the records, their statistics and the
scan's skipped list:

- statistics: the records' partial statistics folded in plan order (exact histograms are
  order-free; float moments are merged in this fixed order, so they are bit-identical too);
- band names, nodata and dtype: those of the first source that wrote a sample (``first``);
- classes: the label names in the records; skipped: the scan's entries plus the workers', by source;
- shards (``how``): ``"built"`` (the records are the shards, already in ``out``), ``"link"`` (hard
  links to the parts' shards, a checked copy across file systems) or ``"repack"`` (cut into full
  shards after the nodata filter, ``shards.repack``).

The manifest is written last: until then the directory holds no finished archive, and running the
same command again completes it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.atomic import TMP_PREFIX
from engine.errors import UserError
from shards.inputs import label_names
from shards.manifest import build_manifest, write_manifest
from shards.repack import chunk_files, plan_repack, write_repacked
from shards.skips import write_skipped
from shards.stats import BandStats, undeclared_nodata_warning
from shards.writer import file_sha256

log = logging.getLogger(__name__)


def fold_stats(records: Sequence[dict], load: Callable[[int], dict], num_bands: int, dtype: str) -> BandStats:
    """The records' statistics folded in plan order (``load(i)``: record i's ``to_arrays`` state)."""
    stats = BandStats(num_bands, dtype)
    for i in range(len(records)):
        stats.merge_arrays(load(i))
    return stats


def assemble(
    out: Path,
    records: Sequence[dict],
    stats: BandStats,
    scan_skipped: Sequence[dict],
    args: dict,
    labelled: bool,
    how: str,
    dirs: Sequence[Path],
    fallback: dict,
    opts,
    imap=map,
    extra: dict | None = None,
) -> dict:
    """Write the shards (per ``how``), skipped.jsonl and manifest.json into ``out``; return the manifest.

    dirs: the folder of each record's shard file (used by "link" and "repack"); fallback: band_names,
    nodata and dtype when no record wrote a sample; opts: prefix, max_samples, max_bytes, fsync;
    imap: a map over the worker pool for "repack"; extra: keys added to the manifest (a part's)."""
    first = next((r["first"] for r in records if r.get("first")), None) or fallback
    skipped = sorted(list(scan_skipped) + [e for r in records for e in r["skipped"]], key=lambda e: e["source"])
    names = [label_names(lab) for r in records for lab in r["labels"]] if labelled else []
    classes = sorted({n for ns in names for n in ns}) if labelled else None
    if how == "repack":
        tasks = plan_repack(chunk_files(records, dirs), opts.prefix, opts.max_samples, opts.max_bytes)
        write = _Repack(str(out), opts.fsync)
        rows = list(imap(write, tasks))
    else:
        # a shard all of whose inputs were skipped holds no sample: not listed, and its file goes
        # (the loader would only warn about it); a --resume rebuilds it the same way
        kept = [i for i, r in enumerate(records) if r["count"] > 0]
        if how == "link":
            for i in kept:
                link_or_copy(Path(dirs[i]) / records[i]["name"], Path(out) / records[i]["name"], records[i])
        else:
            for r in records:
                if r["count"] == 0:
                    (Path(out) / r["name"]).unlink(missing_ok=True)
        rows = [{k: records[i][k] for k in ("name", "count", "bytes", "sha256")} for i in kept]
    manifest = build_manifest(
        args,
        rows,
        first["band_names"],
        first["dtype"],
        first["nodata"],
        classes,
        stats.result(),
        multilabel=any(len(ns) > 1 for ns in names),
    )
    if extra:
        manifest.update(extra)
    warning = undeclared_nodata_warning([z for r in records for z in r.get("zeros", [])])
    if warning:
        log.warning("%s", warning)
    write_skipped(out, skipped)
    write_manifest(out, manifest)
    return manifest


class _Repack:
    """Picklable ``write_repacked`` with its output folder bound (for the worker pool)."""

    def __init__(self, out_dir: str, fsync: bool):
        self.out_dir, self.fsync = out_dir, fsync

    def __call__(self, task):
        return write_repacked(task, self.out_dir, self.fsync)


def link_or_copy(src: Path, dst: Path, rec: dict) -> str:
    """Put the part's shard ``src`` at ``dst``: a hard link (same bytes, no copy), or across file
    systems a copy whose sha256 must match the record. Idempotent; a crash leaves ``dst`` either
    absent or complete. -> 'linked', 'copied' or 'present'."""
    if dst.exists():
        # published only by link or by rename after a checked copy: a full-size file is this shard
        if (src.exists() and os.path.samefile(src, dst)) or dst.stat().st_size == rec["bytes"]:
            return "present"
        dst.unlink()
    if not src.is_file():
        raise UserError(f"merge: '{src}' is missing; its part lists it (rerun that part with --resume)")
    if src.stat().st_size != rec["bytes"]:
        raise UserError(
            f"merge: '{src}' has {src.stat().st_size} bytes, its part's record says {rec['bytes']}; "
            "rerun that part with --resume"
        )
    try:
        os.link(src, dst)
        return "linked"
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            raise
    tmp = dst.with_name(f"{TMP_PREFIX}{dst.name}.{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        if file_sha256(tmp) != rec["sha256"]:
            raise UserError(f"merge: '{src}' does not match its sha256; rerun that part with --resume")
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return "copied"
