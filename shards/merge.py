"""``geoexplora-convert merge PART_DIR... --out DIR``: join ``--part K/N`` runs into one archive.

The result is byte-identical to a single-node run with the same settings: the same shard files,
skipped.jsonl and manifest.json (``converter.args`` is the parts' with ``part`` null; ``workers`` is
part 1's). Shards are hard-linked from the parts into ``--out`` (no copy; across file systems a
copy checked against the part's sha256); with ``--max-nodata`` below 1 the parts' shards are cut
into full ones (``shards.repack``). The parts are left as they are; remove them once the merged
archive verifies. Crash-safe: each shard appears complete or not at all, manifest.json comes last,
and running the same merge again finishes an interrupted one.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import multiprocessing as mp
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from engine.errors import UserError
from shards.assemble import assemble
from shards.manifest import summary_lines
from shards.options import OneLineParser
from shards.parts import read_parts
from shards.state import MANIFEST, SKIPPED, classify

log = logging.getLogger("geoexplora.convert")


def merge_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="geoexplora-convert merge",
        description="Join the output folders of 'geoexplora-convert ... --part K/N' runs "
        "into one archive, identical to a single-node conversion.",
    )
    p.add_argument("parts", nargs="+", metavar="PART_DIR", help="the --out folder of every part, 1/N .. N/N")
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="the merged archive (a new or empty folder, or an interrupted merge of the same parts)",
    )
    p.add_argument("--workers", type=int, default=1, help="processes for cutting shards (only with --max-nodata)")
    p.add_argument("--fsync", action="store_true", help="fsync every shard written (as the conversion's --fsync)")
    return p


class _Opts:
    """The settings ``assemble`` needs, from the parts' recorded arguments."""

    def __init__(self, args: dict, fsync: bool):
        self.prefix, self.max_samples, self.max_bytes = args["prefix"], args["max_samples"], args["max_bytes"]
        self.fsync = fsync


def merge(part_dirs: Sequence[str], out: str, workers: int = 1, fsync: bool = False) -> dict:
    """Merge (see module docstring); returns the manifest. UserError when the parts do not fit."""
    parts = read_parts(part_dirs)
    out_dir = Path(out)
    ours, foreign = classify(out_dir, parts.args["prefix"])
    if foreign:
        raise UserError(
            f"--out '{out_dir}' holds files the merge did not write ('{foreign[0]}'); choose a new or empty directory"
        )
    if MANIFEST in ours:
        raise UserError(f"--out '{out_dir}' already holds a finished archive; choose a new or empty directory")
    if any(out_dir.resolve() == d.resolve() for d in parts.dirs):
        raise UserError(f"--out '{out_dir}' is one of the parts; merge into a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not any(r["count"] for r in parts.records):
        raise UserError(
            "merge: the parts hold no sample (every chip exceeded --max-nodata or every file was "
            f"skipped); see the parts' {SKIPPED}"
        )
    repack = float(parts.args["max_nodata"]) < 1.0
    opts = _Opts(parts.args, fsync)
    pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if repack and workers > 1 else None
    try:
        return assemble(
            out_dir,
            parts.records,
            parts.stats(),
            parts.scan_skipped,
            parts.args,
            labelled=parts.args.get("labels") not in (None, "", "none"),
            how="repack" if repack else "link",
            dirs=parts.record_dirs,
            fallback=parts.fallback,
            opts=opts,
            imap=pool.map if pool else map,
        )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def run_merge(argv: Sequence[str]) -> int:
    a = merge_parser().parse_args(argv)
    if a.workers < 1:
        raise UserError(f"--workers {a.workers}: must be >= 1")
    t0 = time.monotonic()
    try:
        m = merge(a.parts, a.out, workers=a.workers, fsync=a.fsync)
    except OSError as e:  # a full or read-only --out, a part folder that vanished
        from shards.convert import os_error_line

        raise UserError(os_error_line(e, a.out)) from None
    for line in summary_lines(m):
        log.info("%s", line)
    print(
        f"done: merged {len(a.parts)} parts -> {m['total_samples']} samples in {len(m['shards'])} shards "
        f"in {time.monotonic() - t0:.1f} s; the part folders can be removed once "
        f"'geoexplora-convert verify {a.out}' passes",
        file=sys.stdout,
    )
    return 0
