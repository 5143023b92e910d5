"""Re-read a shard directory and check it against its manifest.

Per shard: present, size and sha256 as listed (hashed in the same pass that parses the tar),
sample count as listed; per sample: both members present, ``.npy`` decodes to a (C, H, W) array
of the manifest's dtype and band count, ``.json`` parses with the required fields; keys unique
across the directory; no unlisted shard files. Manifest: strict JSON (no NaN/Infinity), shard
counts add up to ``total_samples``, stats sized to the bands, each statistic finite (null only
for a band with count 0), ordered (min <= p2 <= p98 <= max, min <= mean <= max, std >= 0) and
counting no more pixels than the samples hold.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.progress import progress
from shards.manifest import NAME as MANIFEST_NAME
from shards.manifest import read_manifest
from shards.state import classify
from shards.workers import Crash, WorkerPool, tick
from shards.writer import IMAGE_EXT, META_EXT

STALL_S = 600.0  # a verify worker that shows no progress this long (a hung read) is killed; reported
REQUIRED_META = ("source", "window", "crs", "transform", "band_names", "nodata", "dtype", "label")


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class _HashingReader(io.RawIOBase):
    """File wrapper that hashes everything read through it (tar parsing + checksum in one pass)."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
            self.n += n
        return n or 0

    def drain(self) -> None:
        buf = bytearray(1 << 20)
        while self.readinto(buf):
            pass


def check_shard(entry: dict, out_dir: str, dtype: str, num_bands: int) -> tuple[list[str], list[str], int]:
    """-> (problems, keys, pixels per band: sum of H*W over its samples) of one listed shard."""
    name = entry["name"]
    path = Path(out_dir) / name
    if not path.is_file():
        return [f"{name}: listed in the manifest but missing"], [], 0
    problems: list[str] = []
    keys: list[str] = []
    pixels = 0
    parsed = False
    with open(path, "rb", buffering=0) as raw:
        reader = _HashingReader(raw)
        try:
            members: dict[str, dict] = {}
            order: list[str] = []
            with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as tar:
                for info in tar:
                    tick()  # moving (a pool worker that goes silent for STALL_S is killed)
                    if not info.isreg():
                        continue
                    key, _, ext = info.name.partition(".")
                    if key not in members:
                        members[key] = {}
                        order.append(key)
                    fh = tar.extractfile(info)
                    if fh is not None:  # a regular member always has one
                        members[key][ext] = fh.read()
            for key in order:
                probs, hw = _check_sample(name, key, members[key], dtype, num_bands)
                problems += probs
                pixels += hw
            keys, parsed = order, True
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{name}: unreadable tar ({e.__class__.__name__}: {e})")
        reader.drain()
    if reader.n != entry.get("bytes"):
        problems.append(f"{name}: {reader.n} bytes, manifest says {entry.get('bytes')}")
    if reader.sha.hexdigest() != entry.get("sha256"):
        problems.append(f"{name}: sha256 does not match the manifest (file changed or corrupt)")
    if parsed and len(keys) != entry.get("count"):
        problems.append(f"{name}: {len(keys)} samples, manifest says {entry.get('count')}")
    return problems, keys, pixels


def _check_sample(shard: str, key: str, m: dict, dtype: str, num_bands: int) -> tuple[list[str], int]:
    """-> (problems, H*W of its array)."""
    where = f"{shard}: sample '{key}'"
    if set(m) != {IMAGE_EXT, META_EXT}:
        return [f"{where}: members {sorted(m)}, expected {[IMAGE_EXT, META_EXT]}"], 0
    out = []
    hw = 0
    try:
        arr = np.load(io.BytesIO(m[IMAGE_EXT]), allow_pickle=False)
        if arr.ndim != 3 or arr.shape[0] != num_bands or arr.dtype != np.dtype(dtype):
            out.append(f"{where}: array {arr.shape} {arr.dtype}, expected ({num_bands}, H, W) {dtype}")
        else:
            hw = arr.shape[1] * arr.shape[2]
    except (ValueError, OSError, EOFError) as e:
        out.append(f"{where}: .npy does not decode ({e})")
    try:
        meta = json.loads(m[META_EXT])
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            out.append(f"{where}: json lacks {missing}")
    except ValueError as e:
        out.append(f"{where}: json does not parse ({e})")
    return out, hw


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def check_manifest_json(out_dir: str) -> list[str]:
    """Problems of manifest.json as a file: Python's json reads NaN/Infinity, strict readers don't."""
    try:
        json.loads((Path(out_dir) / MANIFEST_NAME).read_text(), parse_constant=_reject_constant)
    except ValueError as e:
        return [f"manifest: not strict JSON ({e}); rerun the conversion with this version"]
    return []


def check_stats(stats: dict, num_bands: int, pixels: int | None) -> list[str]:
    """Problems of the manifest's ``stats`` (see module docstring); ``pixels``: H*W summed over
    every sample the shards hold (a band's valid-pixel count can't exceed it), None if unknown."""
    out = []
    keys = ("count", "mean", "std", "min", "max", "p2", "p98")
    if not all(isinstance(stats.get(k), list) and len(stats[k]) == num_bands for k in keys):
        return [f"manifest: stats must hold {list(keys)}, {num_bands} entries each"]
    for b in range(num_bands):
        n, row = stats["count"][b], {k: stats[k][b] for k in keys[1:]}
        where = f"manifest: stats of band {b}"
        if not isinstance(n, int) or n < 0 or (pixels is not None and n > pixels):
            out.append(f"{where}: count {n!r}, but the samples hold {pixels} pixels a band")
            continue
        if n == 0:
            if any(v is not None for v in row.values()):
                out.append(f"{where}: count 0 but values {row}")
            continue
        bad = [k for k, v in row.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            out.append(f"{where}: {', '.join(bad)} not a finite number ({ {k: row[k] for k in bad} })")
            continue
        tol = 1e-9 * max(1.0, abs(row["min"]), abs(row["max"]))  # float rounding of mean and percentiles
        lo, hi = row["min"] - tol, row["max"] + tol
        if not (
            lo <= row["p2"] <= row["p98"] + tol and row["p98"] <= hi and lo <= row["mean"] <= hi and row["std"] >= 0
        ):
            out.append(f"{where}: out of order (min <= p2 <= p98 <= max, min <= mean <= max, std >= 0): {row}")
    return out


def verify(out_dir: str, workers: int = 1) -> VerifyReport:
    """Check ``out_dir`` (see module docstring); raises UserError when there is no manifest."""
    m = read_manifest(Path(out_dir))
    rep = VerifyReport(shards=len(m["shards"]))
    rep.problems += check_manifest_json(out_dir)
    listed = {s["name"] for s in m["shards"]}
    prefix = m["shards"][0]["name"].rsplit("-", 1)[0] if m["shards"] else "shard"
    ours, _ = classify(Path(out_dir), prefix)
    for name in ours:
        if name.endswith(".tar") and name not in listed:
            rep.problems.append(f"{name}: shard file not listed in the manifest")
    nb = int(m.get("num_bands", 0))
    if len(m.get("band_names") or []) != nb:
        rep.problems.append(f"manifest: {len(m.get('band_names') or [])} band names for {nb} bands")
    listed_total = sum(s.get("count", 0) for s in m["shards"] if isinstance(s.get("count"), int))
    if listed_total != m.get("total_samples"):
        rep.problems.append(f"manifest: total_samples {m.get('total_samples')}, its shards list {listed_total}")
    fn = functools.partial(check_shard, out_dir=str(out_dir), dtype=m["dtype"], num_bands=nb)
    pool = WorkerPool(workers if len(m["shards"]) > 1 else 1, stall_s=STALL_S)
    results: list = [None] * len(m["shards"])
    try:
        for i, got in progress(pool.run(fn, m["shards"]), total=len(m["shards"]), desc="verify", unit="shard"):
            results[i] = got
    except BaseException:
        pool.close(abort=True)
        raise
    pool.close()
    pixels, shard_problems = 0, False
    seen: dict[str, str] = {}
    for entry, got in zip(m["shards"], results):  # manifest order: the same report every time
        if isinstance(got, Crash):
            got = ([f"{entry['name']}: reading it killed the verify worker ({got.how()})"], [], 0)
        problems, keys, hw = got
        rep.problems += problems
        shard_problems |= bool(problems)
        rep.samples += len(keys)
        pixels += hw
        for k in keys:
            if k in seen:
                rep.problems.append(f"{entry['name']}: key '{k}' already in {seen[k]}")
            seen[k] = entry["name"]
    if rep.samples != m.get("total_samples") and not any("unreadable" in p for p in rep.problems):
        rep.problems.append(f"manifest: total_samples {m.get('total_samples')}, shards hold {rep.samples}")
    if m.get("stats") is not None:
        rep.problems += check_stats(m["stats"], nb, None if shard_problems else pixels)
    stray = [n for n in os.listdir(out_dir) if n.startswith(".tmp-") or n == ".convert-state"]
    if stray:
        rep.problems.append(f"'{stray[0]}': leftover of an unfinished run; rerun the conversion with --resume")
    return rep
