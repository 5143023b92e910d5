"""Resolve a shard spec into an ordered list of shard URLs plus the manifest that describes them.

Accepted specs (``--data.shards``):

- a directory holding ``manifest.json`` (the converter's output): shards listed in the manifest;
- a ``manifest.json`` path: the same;
- a glob: ``/data/s2/shard-*.tar`` (sorted);
- a brace pattern: ``/data/s2/shard-{000000..000127}.tar``;
- a list file (any non-``.tar`` file, one URL or path per line, ``#`` comments; relative paths are
  relative to the list file);
- a single ``.tar`` path;
- remote URLs webdataset can open: ``pipe:aws s3 cp s3://b/shard-{000000..000127}.tar -``,
  ``https://...`` (never checked for existence here; give ``--data.manifest`` for their stats);
- several of the above joined by ``::`` or given as a Python list.

Local shards are checked for existence up front so a typo fails at start-up with one line, not as
a worker traceback hours later. The manifest is searched beside local shards when the spec does not
name it; its per-shard ``count`` lets the loader size epochs and split work exactly. Shards it
lists with 0 samples are left out with a warning (an error when all are).
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from engine.errors import UserError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "geoexplora-shards/1"
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://", "hf://", "sftp://", "scp://")


@dataclass
class ShardSet:
    """Resolved shards: ``urls`` in spec order, ``counts[i]`` samples in ``urls[i]`` (None = unknown)."""

    urls: list[str]
    counts: list[int | None]
    manifest: dict | None
    manifest_path: str | None

    @property
    def total_samples(self) -> int | None:
        """Sum of known counts, or None when any shard's count is unknown."""
        return known_sum(self.counts)


def known_sum(counts: Sequence[int | None]) -> int | None:
    """Sum of ``counts``, or None when any of them is unknown (None)."""
    known = [int(c) for c in counts if c is not None]
    return sum(known) if len(known) == len(counts) else None


def is_remote(url: str) -> bool:
    return url.startswith(_REMOTE_PREFIXES)


def load_manifest(path: str | Path, flag: str = "--data.shards") -> dict:
    """Read and sanity-check a converter manifest; UserError on anything a user must fix."""
    p = Path(path)
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{flag} '{p}': manifest not found; run the converter (shards/) first") from None
    except (OSError, ValueError) as e:
        raise UserError(
            f"{flag} '{p}': unreadable manifest ({e.__class__.__name__}: {e}); re-run the converter or restore the file"
        ) from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise UserError(
            f"{flag} '{p}': format {got!r} is not {MANIFEST_FORMAT!r}; "
            "convert the archive with this version's converter"
        )
    shards = m.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s for s in shards):
        raise UserError(f"{flag} '{p}': 'shards' must be a list of {{name, count, ...}} entries")
    return m


def _expand_pattern(spec: str, flag: str) -> list[str]:
    """Brace-expand, then glob local patterns; error when a local pattern matches nothing."""
    out: list[str] = []
    for piece in braceexpand.braceexpand(spec):
        if is_remote(piece):
            out.append(piece)
        elif any(ch in piece for ch in "*?["):
            hits = sorted(globlib.glob(piece))
            if not hits:
                raise UserError(f"{flag} '{piece}' matched no files; check the path or run the converter first")
            out.extend(hits)
        else:
            out.append(piece)
    return out


def _from_manifest_file(path: Path, flag: str) -> tuple[list[str], dict]:
    m = load_manifest(path, flag)
    root = path.parent
    urls = [str(root / s["name"]) for s in m["shards"]]
    if not urls:
        raise UserError(f"{flag} '{path}': the manifest lists no shards; the conversion produced nothing")
    return urls, m


def _from_list_file(path: Path, flag: str) -> list[str]:
    urls = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not is_remote(line) and not os.path.isabs(line):
            line = str(path.parent / line)
        urls.extend(_expand_pattern(line, flag))
    if not urls:
        raise UserError(f"{flag} '{path}': list file names no shards")
    return urls


def _expand_one(spec: str, flag: str) -> tuple[list[str], tuple[Path, dict] | None]:
    """One spec string -> (urls, (manifest path, manifest) when the spec itself names it)."""
    if is_remote(spec):
        return list(braceexpand.braceexpand(spec)), None
    p = Path(spec)
    if p.is_dir():
        mp = p / MANIFEST_NAME
        if not mp.is_file():
            raise UserError(
                f"{flag} '{spec}': directory has no {MANIFEST_NAME}; pass a glob like "
                f"'{p}/*.tar' or convert the archive with the converter first"
            )
        urls, m = _from_manifest_file(mp, flag)
        return urls, (mp, m)
    if p.is_file():
        if p.name == MANIFEST_NAME or p.suffix == ".json":
            urls, m = _from_manifest_file(p, flag)
            return urls, (p, m)
        if p.suffix == ".tar":
            return [str(p)], None
        return _from_list_file(p, flag), None
    urls = _expand_pattern(spec, flag)
    if urls == [spec]:
        raise UserError(
            f"{flag} '{spec}': no such file or directory; give a shard directory "
            "(with manifest.json), a glob, a brace pattern or a list file"
        )
    return urls, None


def _find_manifest(urls: list[str], flag: str) -> tuple[Path, dict] | None:
    """The manifest beside the local shards, when they all share one directory that has one."""
    dirs = {str(Path(u).parent) for u in urls if not is_remote(u)}
    if len(dirs) != 1 or any(is_remote(u) for u in urls):
        return None
    mp = Path(dirs.pop()) / MANIFEST_NAME
    return (mp, load_manifest(mp, flag)) if mp.is_file() else None


def resolve_shards(spec: str | Sequence[str], manifest: str = "", flag: str = "--data.shards") -> ShardSet:
    """Expand ``spec`` (see module docstring) and attach the manifest (``manifest`` path wins).

    Raises UserError for an empty spec, patterns matching nothing, missing local shards, a
    directory without manifest.json or an unreadable/foreign manifest.
    """
    if isinstance(spec, str):
        parts = [s for s in spec.split("::") if s.strip()]
    else:
        parts = [str(s) for s in spec]
    if not parts:
        raise UserError(f"{flag}: empty shard spec; give a shard directory, a glob, a brace pattern or a list file")
    urls: list[str] = []
    found: tuple[Path, dict] | None = None
    for part in parts:
        got, named = _expand_one(part.strip(), flag)
        urls.extend(got)
        if named is not None and found is None:
            found = named
    missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{flag}: shard '{missing[0]}' does not exist{more}; check the spec or re-run the converter")
    dupes = len(urls) - len(set(urls))
    if dupes:
        log.warning("%s lists %d shard(s) more than once; they will be read that many times", flag, dupes)
    if manifest:
        mp = Path(manifest)
        found = (mp, load_manifest(mp, "--data.manifest"))
    elif found is None:
        found = _find_manifest(urls, flag)
    counts: list[int | None] = [None] * len(urls)
    m = None
    mpath = None
    if found is not None:
        mpath, m = str(found[0]), found[1]
        by_name = {s["name"]: s.get("count") for s in m["shards"]}
        counts = [by_name.get(os.path.basename(u.rstrip(" -").split()[-1] if is_remote(u) else u)) for u in urls]
        counts = [int(c) if isinstance(c, (int, float)) else None for c in counts]
        urls, counts = _drop_empty(urls, counts, flag, mpath)
    return ShardSet(urls=urls, counts=counts, manifest=m, manifest_path=mpath)


def _drop_empty(urls: list[str], counts: list[int | None], flag: str, mpath: str) -> tuple[list[str], list[int | None]]:
    """Leave out shards the manifest lists with 0 samples: read endlessly, a resampled stream would
    spin on them without ever yielding. All of them empty is an error."""
    empty = [u for u, c in zip(urls, counts) if c == 0]
    if not empty:
        return urls, counts
    if len(empty) == len(urls):
        raise UserError(
            f"{flag}: every shard listed in '{mpath}' holds 0 samples ({len(urls)} shard(s)); "
            "re-run the converter (see its skipped.jsonl for why inputs were skipped)"
        )
    log.warning(
        "%s: skipping %d shard(s) the manifest lists with 0 samples: %s%s",
        flag,
        len(empty),
        ", ".join(os.path.basename(u) for u in empty[:3]),
        " ..." if len(empty) > 3 else "",
    )
    kept = [(u, c) for u, c in zip(urls, counts) if c != 0]
    return [u for u, _ in kept], [c for _, c in kept]
