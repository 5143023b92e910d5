"""Input-pipeline throughput: naive per-file GeoTIFF loader vs our shard stream, in the same run.

    python -m engine.data.bench [--workers 2] [--files 600] [--kinds s2,rgb] [--latency-ms 0,10]
                                [--repeat 3] [--json [PATH]]
    python -m engine.data.bench --shards DIR [--tifs DIR] --workers N --json

Without ``--shards`` it generates archives with ``shards.synthetic`` (s2: 13-band 128x128 uint16;
rgb: 3-band 256x256 uint8) and converts them with ``shards.convert`` (100 samples per shard).
With ``--shards`` it measures that archive; ``--tifs`` names the GeoTIFF directory for the naive
loader (default: the converter's recorded input, when it still exists).

Providers, same view, same batch size, same worker count, alternating within each repeat:

- ``naive``       map-style Dataset, ``rasterio.open(path).read()`` per item, shuffled sampler;
- ``stream``      our ShardLoader (tar shards, shuffle buffer, batching in workers, uint8/uint16
                  across the worker boundary);
- ``stream-f32``  the same stream but normalised to float32 inside the workers (what the design
                  avoids), to show what crossing the boundary in float costs.

Both views end with normalisation as the trainer does it: ``decode`` = identity crop (decode +
normalise only), ``mae`` = random-resized 224 crop + flips/rotations. ``naive`` and ``stream``
normalise in the main process (our ``to_device``; on a GPU host that step runs on the device).
``--latency-ms`` adds a sleep per file open (per GeoTIFF for ``naive``, per shard for
``stream``) to model network storage. MB/s counts source pixel bytes (C*H*W*itemsize).
The multi-crop transform (DINOv2: 2x224 + 8x96 crops + iBOT masks) is timed separately,
in-process on one thread (as in a worker), in ms per sample.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import rasterio
import torch
from torch.utils.data import DataLoader, Dataset

from engine.data.loader import ShardLoader
from engine.data.multicrop import DinoMultiCrop, EvalView, SingleCrop
from engine.data.normalize import Normalizer, to_device
from engine.data.pipeline import ShardStream, StreamPlan
from engine.data.samples import ShardOpener
from engine.data.shardspec import resolve_shards
from engine.errors import UserError, cli_entry

KINDS = {"s2": 128, "rgb": 256}


class NaiveGeoTiffDataset(Dataset):
    """The baseline: one rasterio open + read per item, then the same view as the stream."""

    def __init__(self, paths: list[str], view, latency_s: float = 0.0):
        self.paths, self.view, self.latency_s = paths, view, latency_s

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        if self.latency_s:
            time.sleep(self.latency_s)
        with rasterio.open(self.paths[i]) as ds:
            arr = ds.read()
        return self.view(arr, np.random.default_rng(i))


class _Collate:
    def __init__(self, view):
        self.view = view

    def __call__(self, items: list[dict]) -> dict:
        return self.view.collate(items, np.random.default_rng(0))


class _FloatInWorker:
    """Wraps a view so batches leave the worker as normalised float32 (the variant we avoid)."""

    def __init__(self, view, normalizer: Normalizer):
        self.view, self.normalizer = view, normalizer

    def __call__(self, arr, rng):
        return self.view(arr, rng)

    def collate(self, items, rng):
        return {k: self.normalizer(v) if k == "images" else v for k, v in self.view.collate(items, rng).items()}


def _view(mode: str, size: int):
    return EvalView(size, crop_pct=1.0) if mode == "decode" else SingleCrop(224, (0.2, 1.0))


def _consume(batches, normalizer: Optional[Normalizer]) -> tuple[int, float]:
    """(samples, seconds) to iterate ``batches`` to the end (worker start-up included, as a training
    epoch pays it), normalising each batch in this process when ``normalizer`` is given."""
    t = time.perf_counter()
    n = 0
    for b in batches:
        if normalizer is not None:
            b = to_device(b, "cpu", normalizer)
        n += int(b["images"].shape[0])
    return n, time.perf_counter() - t


def run_naive(paths, view, normalizer, workers, batch, latency_s) -> tuple[int, float]:
    ds = NaiveGeoTiffDataset(paths, view, latency_s)
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=_Collate(view),
                    drop_last=False)
    return _consume(dl, normalizer)


def run_stream(shards, view, normalizer, workers, batch, latency_s, buffer) -> tuple[int, float]:
    plan = StreamPlan(urls=shards.urls, counts=shards.counts, batch_size=batch, resampled=False,
                      shuffle_buffer=buffer, drop_last=False, num_bands=(shards.manifest or {}).get("num_bands"),
                      max_skip_rate=0.0)
    loader = ShardLoader(ShardStream(plan, view, opener=ShardOpener(latency_s)), workers)
    return _consume(loader, normalizer)


def multicrop_cost(shards, n: int = 40) -> dict:
    """ms/sample of the DINOv2 multi-crop view (+ collate with iBOT masks), one thread."""
    from engine.data.samples import decode_image, iter_shard

    arrs = []
    for url in shards.urls:
        for s in iter_shard(url, ShardOpener()):
            arrs.append(decode_image(s, None))
            if len(arrs) == n:
                break
        if len(arrs) == n:
            break
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        view = DinoMultiCrop(224, 96, 2, 8, patch_size=14)
        rng = np.random.default_rng(0)
        view(arrs[0], rng)
        t = time.perf_counter()
        items = [view(a, rng) for a in arrs]
        per_sample = (time.perf_counter() - t) / len(arrs)
        t = time.perf_counter()
        view.collate(items, rng)
        collate = (time.perf_counter() - t) / len(arrs)
    finally:
        torch.set_num_threads(threads)
    return {"transform_ms_per_sample": 1000 * per_sample, "collate_masks_ms_per_sample": 1000 * collate,
            "bands": int(arrs[0].shape[0]), "size": list(arrs[0].shape[1:]), "dtype": str(arrs[0].dtype)}


def _generate(work: Path, kind: str, files: int) -> tuple[Path, Path]:
    from shards.convert import run_convert
    from shards.synthetic import generate_archive

    src, out = work / f"{kind}-tifs", work / f"{kind}-shards"
    if not (out / "manifest.json").is_file():
        t = time.perf_counter()
        generate_archive(src, files, KINDS[kind], kind=kind, layout="flat")
        run_convert([str(src), "-o", str(out), "--max-samples-per-shard", "100", "--overwrite"])
        print(f"{kind}: generated and converted {files} files in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return src, out


def _tif_dir(shards, tifs: Optional[str]) -> Optional[Path]:
    if tifs:
        return Path(tifs)
    args = ((shards.manifest or {}).get("converter") or {}).get("args") or {}
    inputs = args.get("inputs") if isinstance(args, dict) else None
    cand = inputs[0] if isinstance(inputs, list) and inputs else inputs
    return Path(cand) if isinstance(cand, str) and Path(cand).is_dir() else None


def bench_archive(name: str, shard_dir: Path, tif_dir: Optional[Path], a) -> tuple[list[dict], dict]:
    shards = resolve_shards(str(shard_dir), flag="--shards")
    m = shards.manifest or {}
    normalizer = Normalizer.from_manifest(m)
    paths = sorted(str(p) for p in tif_dir.rglob("*.tif")) if tif_dir else []
    if tif_dir and not paths:
        raise UserError(f"--tifs '{tif_dir}': no .tif files found")
    nbytes = int(np.dtype(m["dtype"]).itemsize) * int(m["num_bands"])
    rows = []
    size = _probe_size(shards)
    px = nbytes * size[0] * size[1]
    for mode in a.modes:
        view = _view(mode, size[0])
        for lat in a.latency_ms:
            providers = {}
            if paths:
                providers["naive"] = lambda: run_naive(paths, view, normalizer, a.workers, a.batch_size, lat / 1000)
            providers["stream"] = lambda: run_stream(shards, view, normalizer, a.workers, a.batch_size, lat / 1000,
                                                     a.buffer)
            if mode == "decode" and lat == 0:
                providers["stream-f32"] = lambda: run_stream(shards, _FloatInWorker(view, normalizer), None,
                                                             a.workers, a.batch_size, 0.0, a.buffer)
            times: dict[str, list[tuple[int, float]]] = {k: [] for k in providers}
            for rep in range(a.repeat + 1):  # round 0 warms the page cache and is discarded
                for provider, fn in providers.items():
                    r = fn()
                    if rep:
                        times[provider].append(r)
            base = None
            for provider, runs in times.items():
                if not runs:
                    continue
                rates = [n / t for n, t in runs]
                med = statistics.median(rates)
                base = med if provider == "naive" else base
                rows.append({"archive": name, "mode": mode, "latency_ms": lat, "provider": provider,
                             "workers": a.workers, "samples_per_s": med, "runs_samples_per_s": rates,
                             "mb_per_s": med * px / 1e6, "vs_naive": (med / base) if base else None})
    cost = multicrop_cost(shards)
    cost["archive"] = name
    return rows, cost


def _probe_size(shards) -> tuple[int, int]:
    from engine.data.samples import decode_image, iter_shard

    s = next(iter_shard(shards.urls[0], ShardOpener()))
    arr = decode_image(s, None)
    return int(arr.shape[1]), int(arr.shape[2])


def _table(rows: list[dict], costs: list[dict]) -> str:
    lines = ["| archive | view | open latency | loader | samples/s | MB/s | vs naive |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['vs_naive']:.2f}x" if r["vs_naive"] else "-"
        lines.append(f"| {r['archive']} | {r['mode']} | {r['latency_ms']:g} ms | {r['provider']} "
                     f"| {r['samples_per_s']:.0f} | {r['mb_per_s']:.1f} | {vs} |")
    lines += ["", "| archive | multi-crop (2x224 + 8x96) ms/sample | collate + iBOT masks ms/sample |",
              "|---|---|---|"]
    for c in costs:
        lines.append(f"| {c['archive']} ({c['bands']}x{c['size'][0]}x{c['size'][1]} {c['dtype']}) "
                     f"| {c['transform_ms_per_sample']:.1f} | {c['collate_masks_ms_per_sample']:.2f} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.data.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default=None, help="measure this converted directory instead of generated ones")
    p.add_argument("--tifs", default=None, help="GeoTIFF directory for the naive loader (with --shards)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--files", type=int, default=600, help="files per generated archive")
    p.add_argument("--kinds", default="s2,rgb", help="generated archives: s2 (13x128x128 uint16), rgb (3x256x256 uint8)")
    p.add_argument("--modes", default="decode,mae", help="views: decode (identity + normalise), mae (224 crop)")
    p.add_argument("--latency-ms", default="0", help="simulated per-open latency(ies), e.g. 0,10")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--buffer", type=int, default=256, help="stream shuffle buffer (samples per worker)")
    p.add_argument("--work", default=None, help="where to generate archives (default: a temp dir)")
    p.add_argument("--main-threads", type=int, default=1,
                   help="torch threads of the main process (normalisation); the workers use 1 each")
    p.add_argument("--json", nargs="?", const="-", default=None, help="write results as JSON to PATH (or stdout)")
    return p


@cli_entry
def main(argv=None) -> int:
    a = parser().parse_args(argv)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    a.latency_ms = [float(v) for v in str(a.latency_ms).split(",") if v.strip()]
    if any(m not in ("decode", "mae") for m in a.modes):
        raise UserError(f"--modes '{','.join(a.modes)}': use decode and/or mae")
    if a.workers < 0 or a.repeat < 1:
        raise UserError("--workers must be >= 0 and --repeat >= 1")
    # With 2 cores and 2 workers, intra-op threads in the main process only fight the workers
    # (and spin-wait in OpenMP barriers on a loaded machine).
    torch.set_num_threads(max(1, a.main_threads))
    targets = []
    if a.shards:
        ss = resolve_shards(a.shards, flag="--shards")
        targets.append((Path(a.shards).name, Path(a.shards), _tif_dir(ss, a.tifs)))
    else:
        work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="geoexplora-databench-"))
        for kind in [k.strip() for k in a.kinds.split(",") if k.strip()]:
            if kind not in KINDS:
                raise UserError(f"--kinds: unknown archive kind {kind!r}; use s2 and/or rgb")
            src, out = _generate(work, kind, a.files)
            targets.append((kind, out, src))
    rows, costs = [], []
    for name, shard_dir, tif_dir in targets:
        r, c = bench_archive(name, shard_dir, tif_dir, a)
        rows += r
        costs.append(c)
    print(_table(rows, costs))
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "settings": {k: v for k, v in vars(a).items() if k != "json"}, "results": rows, "multicrop": costs}
    if a.json == "-":
        print(json.dumps(result, indent=1))
    elif a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
