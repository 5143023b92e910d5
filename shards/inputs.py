"""What to convert: input listing, relative paths, sample keys, labels and JSON sidecars.

Inputs are directories (searched recursively), glob patterns, or list files (one path per line,
relative to the list file, ``#`` comments). Files are sorted by relative path, so the order (and
with it every shard) depends only on the archive, never on the file system's listing order.
"""

from __future__ import annotations

import csv
import glob as globlib
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_EXTS = ("tif", "tiff", "png", "jpg", "jpeg")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")
# separates the class names of a multi-label CSV cell (BigEarthNet: "Pastures;Sea and ocean")
LABEL_SEP = ";"


@dataclass
class InputFile:
    path: str  # as given/found (absolute or relative to the cwd)
    relpath: str  # relative to the input root, '/'-separated: recorded as "source"
    # --band-files scenes only: band token -> [(path, relpath)] of the files that match it
    bands: dict[str, list[tuple[str, str]]] | None = None


def _is_glob(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed = []
    for p in parts:
        if _is_glob(p):
            break
        fixed.append(p)
    return str(Path(*fixed)) if fixed else "."


def list_inputs(
    specs: Sequence[str], exts: Sequence[str] = DEFAULT_EXTS, root: str | None = None, exclude: str | None = None
) -> list[InputFile]:
    """Expand directories/globs/list files into sorted, de-duplicated InputFiles.

    Relative paths are taken from ``root`` when given, else from the directory input, the fixed
    prefix of a glob, or the common parent of a list file's entries. ``exclude`` (the output
    directory) is never listed. Raises UserError when an input does not exist or nothing matches.
    """
    suffixes = {"." + e.lower().lstrip(".") for e in exts}
    excl = os.path.realpath(exclude) if exclude else None
    found: dict[str, InputFile] = {}
    for spec in specs:
        files, base = _expand(spec, suffixes, excl)
        base = root or base
        for f in files:
            real = os.path.realpath(f)
            if real in found:
                continue
            rel = os.path.relpath(os.path.abspath(f), os.path.abspath(base))
            if rel.startswith(".."):
                raise UserError(f"--root '{root}': input '{f}' is outside it; pick a root that contains every input")
            found[real] = InputFile(path=f, relpath=Path(rel).as_posix())
    if not found:
        raise UserError(
            f"input {' '.join(repr(s) for s in specs)}: no raster files found "
            f"(looked for {', '.join(sorted(suffixes))}); check the path or --ext"
        )
    return sorted(found.values(), key=lambda x: x.relpath)


def _expand(spec: str, suffixes: set[str], excl: str | None) -> tuple[list[str], str]:
    p = Path(spec)
    if p.is_dir():
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(p):
            if excl is not None:
                dirnames[:] = [d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) != excl]
            out.extend(os.path.join(dirpath, n) for n in filenames if Path(n).suffix.lower() in suffixes)
        return out, str(p)
    if _is_glob(spec):
        # non-regular files (a FIFO named x.tif) stay listed: the scan reports them as skipped
        hits = [h for h in globlib.glob(spec, recursive=True) if not os.path.isdir(h)]
        return [h for h in hits if Path(h).suffix.lower() in suffixes], _glob_root(spec)
    if p.exists() and p.suffix.lower() in suffixes:  # one image (the scan skips a non-regular one)
        return [str(p)], str(p.parent)
    if p.exists() and not p.is_file():  # a FIFO or device read as a list file would block or never end
        raise UserError(f"input '{spec}': {not_regular(spec)}; give a directory, a glob or a list file")
    if p.is_file():
        entries = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append(line if os.path.isabs(line) else str(p.parent / line))
        missing = [e for e in entries if not os.path.exists(e) or os.path.isdir(e)]
        if missing:
            raise UserError(
                f"input list '{spec}': '{missing[0]}' does not exist or is a directory"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        parents = [os.path.dirname(os.path.abspath(e)) for e in entries]
        return entries, os.path.commonpath(parents) if parents else str(p.parent)
    raise UserError(f"input '{spec}': no such file or directory; give a directory, a glob or a list file")


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
)


def not_regular(path: str) -> str | None:
    """None for a regular file (or a link to one); else the skipped.jsonl reason. Checked before
    anything opens the path: opening a FIFO blocks until a writer appears, a device never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"{e.__class__.__name__}: {e.strerror}"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    return f"{kind}, not a regular file; only regular files are read"


def base_key(relpath: str) -> str:
    """Stable, dot-free sample key of a file: its relative path without extension, characters
    outside [A-Za-z0-9_-] replaced by '_' in each folder; a short hash of the path is appended
    when that replacement lost information (so distinct files keep distinct keys)."""
    stem = relpath.rsplit(".", 1)[0] if "." in Path(relpath).name else relpath
    parts = [_UNSAFE.sub("_", seg).lstrip("_") or "x" for seg in stem.split("/")]
    key = "/".join(parts)
    if key != stem:
        key += "_" + hashlib.sha1(relpath.encode()).hexdigest()[:8]
    return key


def assign_keys(relpaths: Sequence[str]) -> list[str]:
    """Keys for a listing; files whose keys collide (x.tif and x.png) get the path hash too."""
    keys = [base_key(r) for r in relpaths]
    seen: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        seen.setdefault(k, []).append(i)
    for k, idx in seen.items():
        if len(idx) > 1:
            for i in idx:
                keys[i] = k + "_" + hashlib.sha1(relpaths[i].encode()).hexdigest()[:8]
    if len(set(keys)) != len(keys):
        raise UserError("input: file names map to colliding sample keys; rename the files")
    return keys


def chip_key(base: str, window, whole: bool) -> str:
    """Whole images keep the file key; chips append their offset: ``<key>_y<row>_x<col>``."""
    return base if whole else f"{base}_y{window[1]}_x{window[0]}"


# ---- labels --------------------------------------------------------------------------------------
def parse_label_spec(spec: str | None) -> tuple[str, object]:
    """--labels: '' / 'none', 'folder' (parent folder), 'folder:N' (N-th ancestor), or a CSV path."""
    if spec is None or spec in ("", "none"):
        return "none", None
    if spec == "folder" or spec.startswith("folder:"):
        level = spec.partition(":")[2] or "1"
        if not level.isdigit() or int(level) < 1:
            raise UserError(f"--labels '{spec}': use folder or folder:N with N >= 1 (2 = grandparent)")
        return "folder", int(level)
    if not os.path.isfile(spec):
        raise UserError(f"--labels '{spec}': not 'folder', 'folder:N' or an existing CSV file (path,label)")
    return "csv", read_label_csv(spec)


def read_label_csv(path: str) -> dict[str, str]:
    """CSV rows ``path,label`` (header optional) -> {path as written: label}; a label cell may hold
    several class names separated by ``;`` (multi-label, see :func:`canonical_label`)."""
    table: dict[str, str] = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 2:
                raise UserError(f"--labels '{path}' line {i + 1}: expected 'path,label'")
            if i == 0 and row[0].strip().lower() in ("path", "file", "filename", "image"):
                continue
            table[row[0].strip()] = canonical_label(row[1])
    if not table:
        raise UserError(f"--labels '{path}': no path,label rows")
    return table


def canonical_label(cell: str) -> str:
    """A CSV label cell, stripped; a multi-label cell ``"a; b;a"`` -> ``"a;b"`` (names stripped,
    empties and repeats dropped, first order kept) so equal label sets give equal strings."""
    cell = cell.strip()
    if LABEL_SEP not in cell:
        return cell
    return LABEL_SEP.join(dict.fromkeys(n.strip() for n in cell.split(LABEL_SEP) if n.strip()))


def label_names(label: str | None) -> list[str]:
    """The class names of one sample's label string: ``"a;b"`` -> ``["a", "b"]``, ``"a"`` -> ``["a"]``,
    None -> []. A label with no separator is one name as is (folder names, single-label CSVs)."""
    if label is None:
        return []
    if LABEL_SEP not in label:
        return [label]
    return [n for n in label.split(LABEL_SEP) if n]


def label_for(f: InputFile, kind: str, arg) -> str | None:
    if kind == "folder":
        parts = f.relpath.split("/")[:-1]
        abs_parts = Path(os.path.abspath(f.path)).parts[:-1]
        src = parts if len(parts) >= arg else list(abs_parts)
        return src[-arg] if len(src) >= arg else None
    if kind == "csv":
        table: dict[str, str] = arg
        for cand in (f.relpath, f.path, os.path.abspath(f.path), Path(f.relpath).name):
            if cand in table:
                return table[cand]
        return None
    return None


# ---- sidecars ------------------------------------------------------------------------------------
def sidecar_path(path: str) -> str | None:
    """fMoW style ``x_rgb.json`` beside ``x_rgb.jpg``, or ``x.tif.json``; None when absent."""
    for cand in (str(Path(path).with_suffix(".json")), path + ".json"):
        if os.path.isfile(cand):
            return cand
    return None


def load_sidecar(path: str) -> dict | None:
    """The sidecar's JSON object; None (with a warning) when absent or unreadable."""
    sc = sidecar_path(path)
    if sc is None:
        return None
    try:
        data = json.loads(Path(sc).read_text())
    except (OSError, ValueError) as e:
        log.warning("sidecar '%s' unreadable (%s); converting the image without it", sc, e)
        return None
    if not isinstance(data, dict):
        log.warning("sidecar '%s' is not a JSON object; converting the image without it", sc)
        return None
    return data
