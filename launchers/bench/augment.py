"""Cost of DINOv2 multi-crop augmentation in a loader worker, with the photometric ops there or on
the device, and the device-side cost per batch; both measured in the same run, interleaved.

    python -m launchers.bench.augment [--images 64] [--size 256] [--bands 3] [--dtype uint8]
                                      [--global-size 224] [--local-size 98] [--num-local 8]
                                      [--batch-size 32] [--repeat 5] [--loader-epochs 3] [--device auto]
                                      [--threads 1] [--kornia] [--json PATH]

Worker side, per image, on one thread (a worker's share of a core): decode the chip's ``.npy``
bytes, the multi-crop view (2 global + ``num_local`` local random-resized crops with flips and
rotations, photometric parameters drawn per crop) and the collate with iBOT masks. Providers:

- ``worker``: colour jitter, grayscale, blur and solarize applied in the worker (``--data.augment_on
  worker``; what every run did before ``augment_on`` existed);
- ``device``: the worker only crops and draws the parameters (``--data.augment_on device``).

Measured as process CPU time (``time.process_time``), so other jobs on the machine change the
numbers less than wall time would; reported as images per CPU-second. The same two providers also
run through a real loader (one persistent worker process reading a tar shard of the chips, batches
crossing to the main process in shared memory): the worker's CPU time per image then includes the
tar read, the IPC and the process itself (``RUSAGE_CHILDREN`` once it is reaped).

Device side, per batch of ``batch_size`` images: ``to_device`` with normalisation only (the
baseline) against photometric ops + normalisation, on ``--device`` (CUDA when present, else CPU with
``--threads`` threads; wall ms and CPU-seconds are reported).
"""

from __future__ import annotations

import io
import itertools
import json
import resource
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from engine.config import CropConfig, DataConfig
from engine.data.builders import build_normalizer, build_photometric, build_pretrain_loader
from engine.data.multicrop import DinoMultiCrop
from engine.data.normalize import to_device
from engine.data.samples import decode_npy
from engine.errors import UserError, cli_entry
from launchers.bench import harness
from launchers.bench.harness import Column


def synthetic_chips(n: int, bands: int, size: int, dtype: str, seed: int = 0) -> tuple[list[bytearray], dict]:
    """``n`` smooth random images as ``.npy`` bytes (as a shard stores them) and a manifest."""
    rng = np.random.default_rng(seed)
    hi = 255.0 if dtype == "uint8" else 10000.0
    coarse = torch.from_numpy(rng.uniform(0, hi, (n, bands, 8, 8)).astype(np.float32))
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    arrs = x.round().clamp(0, hi).numpy().astype(dtype)
    chips = []
    for a in arrs:
        buf = io.BytesIO()
        np.save(buf, a)
        chips.append(bytearray(buf.getvalue()))
    px = arrs.transpose(1, 0, 2, 3).reshape(bands, -1).astype(np.float64)
    stats = {
        "mean": px.mean(1).tolist(),
        "std": px.std(1).tolist(),
        "p2": np.percentile(px, 2, axis=1).tolist(),
        "p98": np.percentile(px, 98, axis=1).tolist(),
    }
    return chips, {"dtype": dtype, "num_bands": bands, "stats": stats}


def write_archive(root: Path, chips: list[bytearray], manifest: dict) -> Path:
    """One tar shard of ``chips`` and its manifest, in the converter's layout."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "shard-000000.tar", "w") as tf:
        for i, chip in enumerate(chips):
            info = tarfile.TarInfo(f"chip{i:06d}.img.npy")
            info.size = len(chip)
            tf.addfile(info, io.BytesIO(bytes(chip)))
    entry = {"name": "shard-000000.tar", "count": len(chips), "bytes": (root / "shard-000000.tar").stat().st_size}
    full = {"format": "geoexplora-shards/1", "shards": [entry], "total_samples": len(chips), **manifest}
    (root / "manifest.json").write_text(json.dumps(full))
    return root


def loader_cost(root: Path, crops: CropConfig, augment_on: Literal["worker", "device"], a) -> float:
    """CPU seconds per image of one persistent loader worker over ``a.loader_epochs`` epochs."""
    cfg = DataConfig(
        shards=str(root),
        batch_size=a.batch_size,
        num_workers=1,
        shuffle_buffer=a.batch_size,
        steps_per_epoch=a.images // a.batch_size,
        augment_on=augment_on,
    )
    loader = build_pretrain_loader(cfg, crops, "dino", patch_size=a.patch_size, rank=0, world_size=1)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = sum(int(b["global_crops"].shape[0]) // crops.num_global for _ in range(a.loader_epochs) for b in loader)
    loader.close()  # reaps the worker, so its CPU time is counted
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / n


def worker_cost(view: DinoMultiCrop, chips: list[bytearray], batch_size: int, seed: int) -> tuple[float, list[dict]]:
    """(CPU seconds per image, the batches) of decode + view + collate on this thread."""
    rng = np.random.default_rng(seed)
    batches, items = [], []
    t = time.process_time()
    for chip in chips:
        items.append(view(decode_npy(chip), rng))
        if len(items) == batch_size:
            batches.append(view.collate(items, rng))
            items = []
    cpu = time.process_time() - t
    return cpu / (len(chips) - len(items)), batches


def device_cost(batches: list[dict], device: torch.device, normalizer, photometric, step=to_device) -> dict:
    """Wall ms and CPU seconds per batch of ``step`` (``to_device``) on ``device`` (CUDA-synchronised)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step(batches[0], device, normalizer, photometric)  # warm-up (allocations, kernels)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for b in batches:
        step(b, device, normalizer, photometric)
    sync()
    n = len(batches)
    return {"wall_ms": 1000 * (time.perf_counter() - wall) / n, "cpu_s": (time.process_time() - cpu) / n}


class KorniaRecipe:
    """kornia's augmentation containers for the same op set (when kornia imports; it draws its own
    parameters, so it could not keep exact resume): ColorJiggle(0.4, 0.4, 0.2, 0.1, p 0.8),
    grayscale p 0.2, blur sigma U(0.1, 2) with a 13 px kernel, solarize; p as for global crop 1
    and local crops. Timed on the device side for comparison only."""

    def __init__(self):
        import kornia.augmentation as K

        def seq(blur_p: float, solarize_p: float):
            return K.AugmentationSequential(
                K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8),
                K.RandomGrayscale(p=0.2),
                K.RandomGaussianBlur((13, 13), (0.1, 2.0), p=blur_p),
                K.RandomSolarize(0.0, 0.0, p=solarize_p),
            )

        self.glob, self.loc = seq(1.0, 0.0), seq(0.5, 0.0)

    def __call__(self, batch: dict, device: torch.device, normalizer, photometric) -> None:
        with torch.no_grad():
            for key, aug in (("global_crops", self.glob), ("local_crops", self.loc)):
                if key in batch:
                    aug(batch[key].to(device, non_blocking=True).float().div_(255.0))


def run(a, device: torch.device) -> list[dict]:
    crops = CropConfig(
        global_size=a.global_size, local_size=a.local_size, num_local=a.num_local, spectral_jitter=a.spectral_jitter
    )
    chips, manifest = synthetic_chips(a.images, a.bands, a.size, a.dtype)
    photometric = build_photometric(crops, manifest, None)
    if photometric is None or photometric.mode(a.bands) is None:
        raise UserError("--bands: no photometric op applies to these crops; use 3 bands or --spectral-jitter")
    normalizer = build_normalizer(DataConfig(), manifest)
    views: dict[Literal["worker", "device"], DinoMultiCrop] = {
        "worker": DinoMultiCrop(crops, patch_size=a.patch_size, photometric=photometric),
        "device": DinoMultiCrop(crops, patch_size=a.patch_size, photometric=photometric, on_device=True),
    }
    threads = a.threads if device.type == "cpu" else torch.get_num_threads()
    kornia = None
    if a.kornia and a.dtype == "uint8" and a.bands == 3:
        try:
            kornia = KorniaRecipe()
        except ImportError:
            print("kornia does not import: its row is left out", file=sys.stderr)
    archive = write_archive(Path(tempfile.mkdtemp(prefix="geoexplora-augbench-")), chips, manifest)
    seeds = itertools.count()

    def one_round() -> dict:
        """Worker side per image (CPU s) on one thread and through a loader process, then the device side
        per batch on what the worker side produced."""
        seed, batches = next(seeds), {}
        out: dict = {"worker thread": {}, "worker process": {}}
        torch.set_num_threads(1)  # a worker's thread
        for name, view in views.items():
            out["worker thread"][name], batches[name] = worker_cost(view, chips, a.batch_size, seed=seed)
            if a.loader_epochs:
                out["worker process"][name] = loader_cost(archive, crops, name, a)
        torch.set_num_threads(threads)
        out["device"] = {
            "normalise": device_cost(batches["worker"], device, normalizer, None),
            "photometric+normalise": device_cost(batches["device"], device, normalizer, photometric),
        }
        if kornia is not None:
            out["device"]["kornia"] = device_cost(batches["device"], device, None, None, kornia)
        return out

    try:
        runs = harness.rounds({"round": one_round}, a.repeat, warmup=1)["round"]  # round 0 warms caches
    finally:
        shutil.rmtree(archive, ignore_errors=True)
    rows = []
    for side in ("worker thread", "worker process"):
        if not runs[0][side]:
            continue
        base_rate = 1.0 / statistics.median(r[side]["worker"] for r in runs)
        for name in views:
            costs = [r[side][name] for r in runs]
            rate = 1.0 / statistics.median(costs)
            rows.append(
                {
                    "side": side,
                    "provider": name,
                    "images_per_cpu_s": rate,
                    "cpu_ms_per_image": 1000 / rate,
                    "vs_worker": rate / base_rate,
                    "runs_images_per_cpu_s": [1 / c for c in costs],
                }
            )
    for name in runs[0]["device"]:
        med = harness.medians([r["device"][name] for r in runs], ("wall_ms", "cpu_s"))
        rows.append(
            {
                "side": str(device),
                "provider": name,
                "batch_size": a.batch_size,
                "wall_ms_per_batch": med["wall_ms"],
                "cpu_s_per_batch": med["cpu_s"],
                "threads": threads if device.type == "cpu" else None,
            }
        )
    return rows


WORKER_COLUMNS = [
    Column("worker side", "side", left=True),
    Column("photometric ops", "provider", left=True),
    Column("images / CPU-s", "images_per_cpu_s", "{:.0f}"),
    Column("CPU ms / image", "cpu_ms_per_image", "{:.2f}"),
    Column("vs worker", "vs_worker", "{:.2f}x"),
]
DEVICE_COLUMNS = [
    Column("device side", lambda r: f"{r['provider']} ({r['side']})", left=True),
    Column("batch", "batch_size"),
    Column("wall ms / batch", "wall_ms_per_batch", "{:.1f}"),
    Column("CPU s / batch", "cpu_s_per_batch", "{:.3f}"),
]


def table(rows: list[dict]) -> str:
    worker = [r for r in rows if "worker" in r["side"]]
    return (
        harness.format_table(worker, WORKER_COLUMNS, markdown=True)
        + "\n\n"
        + harness.format_table([r for r in rows if r not in worker], DEVICE_COLUMNS, markdown=True)
    )


def parser():
    p = harness.parser(__doc__, "python -m launchers.bench.augment")
    p.add_argument("--images", type=int, default=64, help="synthetic chips per measurement")
    p.add_argument("--size", type=int, default=256, help="chip side (pixels)")
    p.add_argument("--bands", type=int, default=3)
    p.add_argument("--dtype", default="uint8", choices=["uint8", "uint16"])
    p.add_argument(
        "--spectral-jitter",
        default="none",
        choices=["none", "shared", "per_band"],
        help="photometric ops of non-RGB chips (--crops.spectral_jitter)",
    )
    p.add_argument("--global-size", type=int, default=CropConfig.global_size)
    p.add_argument("--local-size", type=int, default=CropConfig.local_size)
    p.add_argument("--num-local", type=int, default=CropConfig.num_local)
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument(
        "--loader-epochs",
        type=int,
        default=3,
        help="epochs of the real-loader measurement (0 skips it); more epochs amortise the worker's start",
    )
    p.add_argument("--device", default="auto", help="device side: auto (cuda if present), cpu or cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the device side on CPU (1: a clean measure of the work; more threads "
        "spin in OpenMP barriers on a loaded machine)",
    )
    p.add_argument(
        "--kornia",
        action="store_true",
        help="also time kornia's containers for the same ops on the device side (uint8 RGB; needs kornia)",
    )
    return p


@cli_entry
def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.repeat < 1 or a.images < a.batch_size:
        raise UserError("--repeat must be >= 1 and --images >= --batch-size")
    if a.device not in ("auto", "cpu", "cuda") or (a.device == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"--device {a.device}: use auto, cpu, or cuda on a machine with a GPU")
    device = torch.device(
        "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    )
    record = harness.start("augment", a, device.type)
    rows = run(a, device)
    print(table(rows))
    harness.save(a.out, record, device=str(device), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
