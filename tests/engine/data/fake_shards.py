"""Tiny shard archives in the binding format (tar of <key>.img.npy + <key>.json, plus manifest.json),
written directly so these tests do not depend on the converter.

Band 0 of sample ``i`` is filled with the constant ``i``: any crop or resize keeps that value, so a
test can tell which samples a batch holds.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def write_shards(
    root: str | Path,
    per_shard: int | Sequence[int] = 4,
    n_shards: int = 4,
    bands: int = 3,
    size: int = 16,
    dtype: str = "uint16",
    classes: Sequence[str] | None = None,
    nodata: float | None = None,
    seed: int = 0,
    bad_ids: Sequence[int] = (),
) -> dict:
    """Write shards into ``root``; returns the manifest (also written as root/manifest.json).

    ``bad_ids``: samples whose ``.img.npy`` member is garbage (corrupt-sample tests)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    counts = [per_shard] * n_shards if isinstance(per_shard, int) else list(per_shard)
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    hi = min(info.max, 1000) if info is not None else 1.0
    entries, pixels, idx = [], [], 0
    for s, count in enumerate(counts):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(root / name, "w") as tf:
            for _ in range(count):
                arr = (rng.uniform(0, hi, (bands, size, size))).astype(dtype)
                arr[0] = idx
                key = f"tile{idx:05d}_0_0"
                meta = {
                    "source": f"tile{idx:05d}.tif",
                    "window": [0, 0, size, size],
                    "crs": "EPSG:4326",
                    "transform": [1, 0, 0, 0, -1, 0],
                    "band_names": [f"B{b}" for b in range(bands)],
                    "nodata": nodata,
                    "dtype": dtype,
                    "gsd": 10.0,
                    "timestamp": None,
                    "label": classes[idx % len(classes)] if classes else None,
                }
                _member(tf, key + ".img.npy", b"not an npy payload" if idx in bad_ids else npy_bytes(arr))
                _member(tf, key + ".json", json.dumps(meta).encode())
                pixels.append(arr.reshape(bands, -1).astype(np.float64))
                idx += 1
        entries.append({"name": name, "count": count, "bytes": (root / name).stat().st_size, "sha256": ""})
    px = np.concatenate(pixels, axis=1)
    manifest = {
        "format": "geoexplora-shards/1",
        "converter": {"version": "test", "args": {}},
        "shards": entries,
        "total_samples": idx,
        "num_bands": bands,
        "band_names": [f"B{b}" for b in range(bands)],
        "dtype": dtype,
        "nodata": nodata,
        "classes": sorted(classes) if classes else None,
        "stats": {
            "count": [int(px.shape[1])] * bands,
            "mean": px.mean(1).tolist(),
            "std": px.std(1).tolist(),
            "min": px.min(1).tolist(),
            "max": px.max(1).tolist(),
            "p2": np.percentile(px, 2, axis=1).tolist(),
            "p98": np.percentile(px, 98, axis=1).tolist(),
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest
