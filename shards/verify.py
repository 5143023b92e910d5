"""Re-read a shard directory and check it against its manifest.

Per shard: present, size and sha256 as listed (hashed in the same pass that parses the tar),
sample count as listed; per sample: both members present, ``.npy`` decodes to a (C, H, W) array
of the manifest's dtype and band count, ``.json`` parses with the required fields; keys unique
across the directory; no unlisted shard files; totals and stats sized to the bands.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing as mp
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.progress import progress
from shards.manifest import read_manifest
from shards.state import classify
from shards.writer import IMAGE_EXT, META_EXT

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


def check_shard(entry: dict, out_dir: str, dtype: str, num_bands: int) -> tuple[list[str], list[str]]:
    """-> (problems, keys) of one shard listed in the manifest."""
    name = entry["name"]
    path = Path(out_dir) / name
    if not path.is_file():
        return [f"{name}: listed in the manifest but missing"], []
    problems: list[str] = []
    keys: list[str] = []
    parsed = False
    with open(path, "rb", buffering=0) as raw:
        reader = _HashingReader(raw)
        try:
            members: dict[str, dict] = {}
            order: list[str] = []
            with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    key, _, ext = info.name.partition(".")
                    if key not in members:
                        members[key] = {}
                        order.append(key)
                    members[key][ext] = tar.extractfile(info).read()
            for key in order:
                problems += _check_sample(name, key, members[key], dtype, num_bands)
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
    return problems, keys


def _check_sample(shard: str, key: str, m: dict, dtype: str, num_bands: int) -> list[str]:
    where = f"{shard}: sample '{key}'"
    if set(m) != {IMAGE_EXT, META_EXT}:
        return [f"{where}: members {sorted(m)}, expected {[IMAGE_EXT, META_EXT]}"]
    out = []
    try:
        arr = np.load(io.BytesIO(m[IMAGE_EXT]), allow_pickle=False)
        if arr.ndim != 3 or arr.shape[0] != num_bands or arr.dtype != np.dtype(dtype):
            out.append(f"{where}: array {arr.shape} {arr.dtype}, expected ({num_bands}, H, W) {dtype}")
    except (ValueError, OSError, EOFError) as e:
        out.append(f"{where}: .npy does not decode ({e})")
    try:
        meta = json.loads(m[META_EXT])
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            out.append(f"{where}: json lacks {missing}")
    except ValueError as e:
        out.append(f"{where}: json does not parse ({e})")
    return out


def verify(out_dir: str, workers: int = 1) -> VerifyReport:
    """Check ``out_dir`` (see module docstring); raises UserError when there is no manifest."""
    m = read_manifest(Path(out_dir))
    rep = VerifyReport(shards=len(m["shards"]))
    listed = {s["name"] for s in m["shards"]}
    prefix = m["shards"][0]["name"].rsplit("-", 1)[0] if m["shards"] else "shard"
    ours, _ = classify(Path(out_dir), prefix)
    for name in ours:
        if name.endswith(".tar") and name not in listed:
            rep.problems.append(f"{name}: shard file not listed in the manifest")
    nb = int(m.get("num_bands", 0))
    if len(m.get("band_names") or []) != nb:
        rep.problems.append(f"manifest: {len(m.get('band_names') or [])} band names for {nb} bands")
    for k, v in (m.get("stats") or {}).items():
        if len(v) != nb:
            rep.problems.append(f"manifest: stats '{k}' has {len(v)} entries for {nb} bands")
    fn = functools.partial(check_shard, out_dir=str(out_dir), dtype=m["dtype"], num_bands=nb)
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 and len(m["shards"]) > 1 else None
    try:
        it = pool.imap(fn, m["shards"]) if pool else map(fn, m["shards"])
        seen: dict[str, str] = {}
        for entry, (problems, keys) in zip(m["shards"], progress(it, total=len(m["shards"]), desc="verify",
                                                                 unit="shard")):
            rep.problems += problems
            rep.samples += len(keys)
            for k in keys:
                if k in seen:
                    rep.problems.append(f"{entry['name']}: key '{k}' already in {seen[k]}")
                seen[k] = entry["name"]
    finally:
        if pool:
            pool.close()
            pool.join()
    if rep.samples != m.get("total_samples") and not any("unreadable" in p for p in rep.problems):
        rep.problems.append(f"manifest: total_samples {m.get('total_samples')}, shards hold {rep.samples}")
    stray = [n for n in os.listdir(out_dir) if n.startswith(".tmp-") or n == ".convert-state"]
    if stray:
        rep.problems.append(f"'{stray[0]}': leftover of an unfinished run; rerun the conversion with --resume")
    return rep
