"""geoexplora-convert: GeoTIFF/JPEG/PNG archive -> WebDataset tar shards + manifest.json.

    geoexplora-convert [convert] INPUT... --out DIR [options]     (convert is the default)
    geoexplora-convert verify DIR [--workers N]
    geoexplora-convert merge PART_DIR... --out DIR [--workers N]   (join --part K/N runs)

Also ``python -m shards.convert``. Exit codes: 0 ok; 1 verify found problems, or converter workers
died where no input could be blamed; 2 bad arguments, input or output (one ``error: ...`` line: a
bad flag, a read-only or full --out, ...); 130 Ctrl-C, 143 SIGTERM (both: finished shards are
kept, partial files removed; rerun with --resume).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys
from collections.abc import Sequence

from engine.errors import UserError, cli_entry
from engine.progress import setup_logging
from shards.chips import parse_band_names, parse_band_tokens, parse_hw
from shards.inputs import DEFAULT_EXTS
from shards.manifest import summary_lines
from shards.options import ConvertOptions, OneLineParser, parse_box_context, parse_part, parse_size

log = logging.getLogger("geoexplora.convert")


def convert_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="geoexplora-convert",
        description="Convert a GeoTIFF/JPEG/PNG archive into WebDataset tar shards with a manifest. "
        "Subcommand 'verify DIR' re-checks a converted directory.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="directory (searched recursively), glob ('data/**/*.tif') or list file (one path a line)",
    )
    p.add_argument("-o", "--out", required=True, help="output directory (new, empty, or a previous run with --resume)")
    p.add_argument("--prefix", default="shard", help="shard file prefix: <out>/<prefix>-000000.tar (default shard)")
    p.add_argument(
        "--root",
        default=None,
        help="directory that sample sources/keys are relative to "
        "(default: the input directory, a glob's fixed prefix, or a list's common parent)",
    )
    p.add_argument("--ext", default=",".join(DEFAULT_EXTS), help="file extensions to convert (default %(default)s)")
    g = p.add_argument_group("metadata")
    g.add_argument(
        "--labels",
        default=None,
        help="'folder' (parent folder name), 'folder:N' (N-th ancestor, "
        "fMoW: folder:2) or a CSV file with path,label rows",
    )
    g.add_argument("--no-sidecars", action="store_true", help="ignore per-image JSON sidecars (x.json beside x.tif)")
    g.add_argument(
        "--band-names",
        default=None,
        help="names of ALL source bands in order, or a preset: "
        "s2 (B1..B8,B8A,B9..B12), rgb; default: band descriptions, else band1..bandN",
    )
    g.add_argument("--nodata", type=float, default=None, help="nodata value for files that declare none")
    g = p.add_argument_group("pixels")
    g.add_argument(
        "--bands",
        default=None,
        help="bands to keep, in output order: 1-based indexes, ranges or "
        "names, e.g. 2-4, 3-1 (reversed) or B4,B3,B2; each band once",
    )
    g.add_argument(
        "--drop-bands", default=None, help="bands to leave out, e.g. B1,B9,B10 (instead of --bands, not with it)"
    )
    g.add_argument("--chip-size", default=None, help="cut windows of N or HxW pixels (default: whole image)")
    g.add_argument("--stride", default=None, help="window step, N or HxW (default: the chip size)")
    g.add_argument(
        "--edge",
        choices=("drop", "pad"),
        default="drop",
        help="windows crossing the image edge: drop them, or pad with nodata (default drop)",
    )
    g.add_argument(
        "--max-nodata",
        type=float,
        default=1.0,
        help="drop chips whose nodata/NaN/padding pixel fraction exceeds this (default 1.0 = keep all)",
    )
    g.add_argument("--resize", default=None, help="resample every sample to N or HxW pixels")
    g.add_argument(
        "--resampling",
        default="bilinear",
        help="GDAL resampling for --resize and for --band-files "
        "bands resampled to the reference grid (default bilinear)",
    )
    g = p.add_argument_group("per-band files, fMoW boxes, parts")
    g.add_argument(
        "--band-files",
        default=None,
        metavar="PATTERN",
        help="one file per band: group files into "
        "scenes by a pattern with {scene} and {band} fields, matched against each file's path, e.g. "
        "'{scene}_{band}.TIF' ('*' matches within a name), or 'safe' for Sentinel-2 .SAFE folders; "
        "--bands lists the bands to stack, in order",
    )
    g.add_argument(
        "--resolution",
        type=float,
        default=None,
        help="pixel size of the stacked scene in CRS units (metres), e.g. 10; default: the finest band's grid",
    )
    g.add_argument(
        "--crop-boxes",
        action="store_true",
        help="one sample per sidecar bounding box (fMoW 'bounding_boxes'), cropped with a context margin",
    )
    g.add_argument(
        "--box-context",
        default=None,
        help="margin around each box: fmow (the fMoW baseline's "
        "size-dependent margin, default) or a fraction of the box size, e.g. 0.15",
    )
    g.add_argument(
        "--part",
        default=None,
        metavar="K/N",
        help="convert part K of N (one node each; join them with 'geoexplora-convert merge')",
    )
    g = p.add_argument_group("output")
    g.add_argument("--max-samples-per-shard", type=int, default=10000)
    g.add_argument("--max-shard-bytes", default="1GiB", help="planned shard size limit (default 1GiB)")
    g.add_argument("--workers", type=int, default=1, help="parallel processes, one shard each at a time")
    g.add_argument(
        "--stall-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="kill a worker that shows no progress for S seconds (a read hung on a stalled file system) "
        "and skip the input it was on; 0 waits without a bound (default 600; needs --workers >= 2)",
    )
    g.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    g.add_argument("--overwrite", action="store_true", help="replace a previous conversion in --out")
    g.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    g.add_argument(
        "--fsync",
        action="store_true",
        help="fsync every shard before the manifest is written "
        "(survives a power cut right after the run; costs a full disk write-back)",
    )
    return p


def options_from_args(a: argparse.Namespace) -> ConvertOptions:
    chip = parse_hw(a.chip_size, "--chip-size") if a.chip_size else None
    return ConvertOptions(
        inputs=list(a.inputs),
        out=a.out,
        prefix=a.prefix,
        root=a.root,
        exts=tuple(e.strip().lstrip(".").lower() for e in a.ext.split(",") if e.strip()),
        labels=a.labels,
        sidecars=not a.no_sidecars,
        chip=chip,
        stride=parse_hw(a.stride, "--stride") if a.stride else None,
        edge=a.edge,
        max_nodata=a.max_nodata,
        bands=parse_band_tokens(a.bands, "--bands"),
        drop_bands=parse_band_tokens(a.drop_bands, "--drop-bands"),
        band_names=parse_band_names(a.band_names),
        nodata=a.nodata,
        resize=parse_hw(a.resize, "--resize") if a.resize else None,
        resampling=a.resampling,
        max_samples=a.max_samples_per_shard,
        max_bytes=parse_size(a.max_shard_bytes, "--max-shard-bytes"),
        workers=a.workers,
        stall_timeout=a.stall_timeout,
        resume=a.resume,
        overwrite=a.overwrite,
        strict=a.strict,
        fsync=a.fsync,
        band_files=a.band_files,
        resolution=a.resolution,
        crop_boxes=a.crop_boxes,
        box_context=parse_box_context(a.box_context),
        part=parse_part(a.part),
    ).validate()


def verify_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="geoexplora-convert verify",
        description="Re-read every shard: counts, sha256, decoding; exit 1 on any problem.",
    )
    p.add_argument("out", metavar="DIR", help="a converted directory (holds manifest.json)")
    p.add_argument("--workers", type=int, default=1)
    return p


def run_verify(argv: Sequence[str]) -> int:
    from shards.verify import verify

    a = verify_parser().parse_args(argv)
    rep = verify(a.out, workers=max(1, a.workers))
    for prob in rep.problems:
        print(f"problem: {prob}", file=sys.stderr)
    status = "OK" if rep.ok else f"{len(rep.problems)} problem(s)"
    print(f"verify: {rep.shards} shards, {rep.samples} samples: {status}")
    return 0 if rep.ok else 1


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler's preemption, ``kill``). Not an Exception, so that it unwinds
    like Ctrl-C through every cleanup (temp files removed, workers killed) and no ``except
    Exception`` mistakes it for a bad input."""


@contextlib.contextmanager
def _sigterm_unwinds():
    def handler(signum, frame):
        # the first TERM unwinds; a second one (``kill -TERM -<pgid>`` reaching us late, an impatient
        # scheduler) must not interrupt the cleanup it started
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (convert() called from a library user's thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


_OS_HINTS = {
    errno.ENOSPC: "free space (or choose another --out), then rerun the same command with --resume: "
    "finished shards are kept",
    errno.EDQUOT: "the disk quota is used up; free space, then rerun the same command with --resume",
    errno.EROFS: "the file system is read-only; choose a writable --out",
    errno.EACCES: "no permission; choose a --out you can write (inputs must be readable)",
    errno.EPERM: "not permitted; choose a --out you can write",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another --out",
    errno.EEXIST: "a part of the path is a file, not a directory; choose another --out",
}


def os_error_line(e: OSError, out: str) -> str:
    """One line for a file-system error that stopped the conversion: which path (--out or an
    input), what the system said, and what to do."""
    path = os.path.abspath(e.filename) if isinstance(e.filename, str) else None
    top = os.path.abspath(out)
    in_out = path is None or os.path.commonpath([path, top]) == top
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    what = f"{e.strerror or e}" + (f" [{code}]" if code else "")
    if not in_out:
        return f"input '{e.filename}': {what}; check that the input exists and is readable"
    at = f" at '{e.filename}'" if path is not None and path != top else ""
    return f"--out '{out}': {what}{at}; {_OS_HINTS.get(e.errno or 0, 'fix it, then rerun with --resume')}"


def run_convert(argv: Sequence[str]) -> int:
    from shards.pipeline import convert

    opts = options_from_args(convert_parser().parse_args(argv))
    try:
        summary = convert(opts)
    except OSError as e:  # reads of bad inputs are skips; what gets here is the output or the listing
        raise UserError(os_error_line(e, opts.out)) from None
    if summary.manifest is not None:
        for line in summary_lines(summary.manifest):
            log.info("%s", line)
    print(summary.line())
    return 0


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    # GDAL's own complaints about a bad file arrive as rasterio INFO lines; skipped.jsonl has them
    logging.getLogger("rasterio").setLevel(logging.WARNING)
    if argv and argv[0] == "verify":
        return run_verify(argv[1:])
    if argv and argv[0] == "merge":
        from shards.merge import run_merge

        return run_merge(argv[1:])
    if argv and argv[0] == "convert":
        argv = argv[1:]
    from shards.workers import WorkerCrashed

    try:
        with _sigterm_unwinds():
            return run_convert(argv)
    except Terminated:
        print("terminated (SIGTERM): finished shards are kept; rerun the same command with --resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    except WorkerCrashed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
