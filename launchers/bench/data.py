"""Input-pipeline throughput: a naive per-file GeoTIFF loader against our shard stream, start-up and
steady state reported apart, in the same run.

    python -m launchers.bench.data [--workers 2] [--files 600] [--kinds s2,rgb] [--modes decode,mae]
                                   [--latency-ms 0,20] [--epochs 3] [--repeat 3] [--json PATH]
    python -m launchers.bench.data --shards DIR [--tifs DIR] --workers N --json PATH

Without ``--shards`` it generates archives with ``shards.synthetic`` (s2: 13-band 128x128 uint16;
rgb: 3-band 256x256 uint8) and converts them with ``shards.convert`` (100 samples per shard). With
``--shards`` it measures that archive; ``--tifs`` names the GeoTIFF directory for the naive loader
(default: the converter's recorded input, when it still exists).

Each provider builds its loader once and reads ``--epochs`` epochs with persistent workers, as a
training run does. Reported per provider (median over ``--repeat`` runs, providers alternating):

- ``start-up s``: from asking for the first batch to receiving it (worker processes start, first
  files open, the shuffle buffer warms up);
- ``steady samples/s``: after the first batch, to the end of the last epoch (epoch boundaries
  included); MB/s counts source pixel bytes (C*H*W*itemsize);
- ``worker CPU ms/sample``: CPU time of the worker processes (reaped, ``RUSAGE_CHILDREN``) per
  sample; with 0 workers, of the main process.

Providers, same view, same batch size, same worker count:

- ``naive``       map-style Dataset, ``rasterio.open(path).read()`` per item, shuffled sampler;
- ``stream``      our ShardLoader (tar shards, shuffle buffer, batching in workers, uint8/uint16
                  across the worker boundary);
- ``stream-f32``  the same stream but normalised to float32 inside the workers (what the design
                  avoids), to show what crossing the boundary in float costs.

Views end with normalisation as the trainer does it: ``decode`` = identity crop (decode +
normalise), ``mae`` = random-resized 224 crop + flips/rotations. ``naive`` and ``stream``
normalise in the main process (``to_device``; on a GPU host that step runs on the device).
``--latency-ms`` adds a sleep per file open (per GeoTIFF for ``naive``, per shard for ``stream``)
to model network storage. The cost of DINOv2 multi-crop augmentation is measured by
``python -m launchers.bench.augment``.
"""

from __future__ import annotations

import functools
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import rasterio
import torch
from torch.utils.data import DataLoader, Dataset

from engine.config import CropConfig, DataConfig
from engine.data.loader import ShardLoader
from engine.data.multicrop import EvalView, SingleCrop
from engine.data.normalize import Normalizer, to_device
from engine.data.samples import ShardOpener, decode_image, iter_shard
from engine.data.shardspec import ShardSet, resolve_shards
from engine.data.stream import ShardStream, StreamPlan
from engine.errors import UserError, cli_entry
from launchers.bench import harness
from launchers.bench.harness import Column

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
    return EvalView(size, crop_pct=1.0) if mode == "decode" else SingleCrop(224, CropConfig())


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(
    epochs: Callable[[], Iterable[Iterable[dict]]],
    close: Callable[[], None],
    normalizer: Normalizer | None,
    workers: int,
) -> dict:
    """Read every epoch of ``epochs()``; start-up, steady rate and worker CPU (see the docstring)."""
    cpu0, main0 = _children_cpu(), time.process_time()
    t0 = time.perf_counter()
    first: float | None = None
    n = 0
    for epoch in epochs():
        for b in epoch:
            if normalizer is not None:
                b = to_device(b, "cpu", normalizer)
            n += int(b["images"].shape[0])
            if first is None:
                first, n_first = time.perf_counter(), n
    end = time.perf_counter()
    close()  # reaps the workers, so their CPU time is counted
    cpu = (_children_cpu() - cpu0) if workers else (time.process_time() - main0)
    assert first is not None, "no batch"
    return {
        "startup_s": first - t0,
        "steady_samples_per_s": (n - n_first) / max(end - first, 1e-9),
        "worker_cpu_ms_per_sample": 1000 * cpu / n,
        "samples": n,
    }


def run_naive(paths, view, normalizer, a, latency_s) -> dict:
    ds = NaiveGeoTiffDataset(paths, view, latency_s)
    dl = DataLoader(
        ds,
        batch_size=a.batch_size,
        shuffle=True,
        num_workers=a.workers,
        collate_fn=_Collate(view),
        drop_last=False,
        persistent_workers=a.workers > 0,
    )
    iters = []

    def epochs():
        for _ in range(a.epochs):
            iters.append(iter(dl))
            yield iters[-1]

    def close():
        for it in iters[-1:]:
            getattr(it, "_shutdown_workers", lambda: None)()

    return measure(epochs, close, normalizer, a.workers)


def run_stream(shards: ShardSet, view, normalizer, a, latency_s) -> dict:
    plan = StreamPlan(
        urls=shards.urls,
        counts=shards.counts,
        batch_size=a.batch_size,
        resampled=False,
        shuffle_buffer=a.buffer,
        max_skip_rate=0.0,
        shuffle_initial=a.batch_size,
        drop_last=False,
        num_bands=(shards.manifest or {}).get("num_bands"),
    )
    data = DataConfig()
    loader = ShardLoader(
        ShardStream(plan, view, opener=ShardOpener(latency_s), num_workers=max(1, a.workers)),
        a.workers,
        data.pin_memory,
        data.prefetch_factor,
    )
    return measure(lambda: (loader for _ in range(a.epochs)), loader.close, normalizer, a.workers)


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


def _tif_dir(shards: ShardSet, tifs: str | None) -> Path | None:
    if tifs:
        return Path(tifs)
    args = ((shards.manifest or {}).get("converter") or {}).get("args") or {}
    inputs = args.get("inputs") if isinstance(args, dict) else None
    cand = inputs[0] if isinstance(inputs, list) and inputs else inputs
    return Path(cand) if isinstance(cand, str) and Path(cand).is_dir() else None


def bench_archive(name: str, shard_dir: Path, tif_dir: Path | None, a) -> list[dict]:
    shards = resolve_shards(str(shard_dir), flag="--shards")
    m = shards.manifest or {}
    normalizer = Normalizer.from_manifest(m)
    paths = sorted(str(p) for p in tif_dir.rglob("*.tif")) if tif_dir else []
    if tif_dir and not paths:
        raise UserError(f"--tifs '{tif_dir}': no .tif files found")
    arr = decode_image(next(iter_shard(shards.urls[0], ShardOpener())), None)
    px = arr.nbytes
    rows = []
    for mode in a.modes:
        view = _view(mode, arr.shape[1])
        for lat in a.latency_ms:
            providers: dict[str, Callable[[], dict]] = {}
            if paths:
                providers["naive"] = functools.partial(run_naive, paths, view, normalizer, a, lat / 1000)
            providers["stream"] = functools.partial(run_stream, shards, view, normalizer, a, lat / 1000)
            if mode == "decode" and lat == 0:
                providers["stream-f32"] = functools.partial(
                    run_stream, shards, _FloatInWorker(view, normalizer), None, a, 0.0
                )
            # round 0 warms the page cache and is dropped; providers alternate within a round
            runs = harness.rounds(providers, a.repeat, warmup=1)
            base = None
            for provider, rs in runs.items():
                med = harness.medians(rs, ("startup_s", "steady_samples_per_s", "worker_cpu_ms_per_sample"))
                base = med["steady_samples_per_s"] if provider == "naive" else base
                rows.append(
                    {
                        "archive": name,
                        "mode": mode,
                        "latency_ms": lat,
                        "provider": provider,
                        "workers": a.workers,
                        **med,
                        "mb_per_s": med["steady_samples_per_s"] * px / 1e6,
                        "vs_naive": med["steady_samples_per_s"] / base if base else None,
                        "runs": rs,
                    }
                )
    return rows


COLUMNS = [
    Column("archive", "archive", left=True),
    Column("view", "mode", left=True),
    Column("open latency", "latency_ms", "{:g} ms", left=True),
    Column("loader", "provider", left=True),
    Column("start-up s", "startup_s", "{:.2f}"),
    Column("steady samples/s", "steady_samples_per_s", "{:.0f}"),
    Column("MB/s", "mb_per_s", "{:.1f}"),
    Column("vs naive", "vs_naive", "{:.2f}x"),
    Column("worker CPU ms/sample", "worker_cpu_ms_per_sample", "{:.2f}"),
]


def parser():
    p = harness.parser(__doc__, "python -m launchers.bench.data")
    p.add_argument("--shards", default=None, help="measure this converted directory instead of generated ones")
    p.add_argument("--tifs", default=None, help="GeoTIFF directory for the naive loader (with --shards)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--files", type=int, default=600, help="files per generated archive")
    p.add_argument(
        "--kinds", default="s2,rgb", help="generated archives: s2 (13x128x128 uint16), rgb (3x256x256 uint8)"
    )
    p.add_argument("--modes", default="decode,mae", help="views: decode (identity + normalise), mae (224 crop)")
    p.add_argument("--latency-ms", default="0", help="simulated per-open latency(ies), e.g. 0,10")
    p.add_argument("--epochs", type=int, default=3, help="epochs per loader (workers persist across them)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--buffer", type=int, default=256, help="stream shuffle buffer (samples per worker)")
    p.add_argument("--work", default=None, help="where to generate archives (default: a temp dir)")
    p.add_argument(
        "--main-threads",
        type=int,
        default=1,
        help="torch threads of the main process (normalisation); the workers use 1 each",
    )
    return p


@cli_entry
def main(argv=None) -> int:
    a = parser().parse_args(argv)
    a.modes = harness.comma_list(a.modes, "--modes", ("decode", "mae"))
    a.latency_ms = harness.comma_list(a.latency_ms, "--latency-ms", cast=float, hint="milliseconds, e.g. 0,20")
    kinds = harness.comma_list(a.kinds, "--kinds", tuple(KINDS))
    if a.workers < 0 or a.repeat < 1 or a.epochs < 1:
        raise UserError("--workers must be >= 0, --repeat and --epochs >= 1")
    record = harness.start("data", a)
    # With 2 cores and 2 workers, intra-op threads in the main process only fight the workers
    # (and spin-wait in OpenMP barriers on a loaded machine).
    torch.set_num_threads(max(1, a.main_threads))
    targets = []
    temp = None if a.shards or a.work else Path(tempfile.mkdtemp(prefix="geoexplora-databench-"))
    try:
        if a.shards:
            ss = resolve_shards(a.shards, flag="--shards")
            targets.append((Path(a.shards).name, Path(a.shards), _tif_dir(ss, a.tifs)))
        else:
            for kind in kinds:
                where = Path(a.work) if a.work else temp
                assert where is not None  # temp is made exactly when --work is not given
                src, out = _generate(where, kind, a.files)
                targets.append((kind, out, src))
        rows = [r for name, shard_dir, tif_dir in targets for r in bench_archive(name, shard_dir, tif_dir, a)]
    finally:
        if temp is not None:  # generated for this run only (--work keeps archives for the next)
            shutil.rmtree(temp, ignore_errors=True)
    print(harness.format_table(rows, COLUMNS, markdown=True))
    harness.save(a.out, record, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
