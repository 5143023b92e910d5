"""Fixtures of the 2-rank pretrain tests: a tiny shard archive in the binding format, tiny base
weights, and a helper that runs ``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/pretrain.py``.

The shards are written directly (tar of ``<key>.img.npy`` + ``<key>.json`` plus manifest.json, see
CONVENTIONS "Shard format") so these tests exercise the trainer, not the converter.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from engine.trainer.process_group import free_port

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launchers" / "pretrain.py"
TINY = REPO / "engine" / "presets" / "tiny_cpu.yaml"


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_rgb_shards(root: Path, n_shards: int = 2, per_shard: int = 16, size: int = 64, seed: int = 0) -> Path:
    """uint8 RGB chips (smooth random fields, so crops differ but are not white noise)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, pixels = [], []
    for s in range(n_shards):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(root / name, "w") as tf:
            for i in range(per_shard):
                coarse = rng.uniform(0, 255, (3, size // 8, size // 8))
                arr = np.clip(np.kron(coarse, np.ones((8, 8))) + rng.normal(0, 12, (3, size, size)), 0, 255)
                arr = arr.astype(np.uint8)
                key = f"scene{s}_{i:03d}_0_0"
                buf = io.BytesIO()
                np.save(buf, arr)
                _add(tf, key + ".img.npy", buf.getvalue())
                meta = {
                    "source": f"scene{s}_{i:03d}.tif",
                    "window": [0, 0, size, size],
                    "crs": None,
                    "transform": [1, 0, 0, 0, -1, 0],
                    "band_names": ["red", "green", "blue"],
                    "nodata": None,
                    "dtype": "uint8",
                    "gsd": None,
                    "timestamp": None,
                    "label": None,
                }
                _add(tf, key + ".json", json.dumps(meta).encode())
                pixels.append(arr.reshape(3, -1).astype(np.float64))
        entries.append({"name": name, "count": per_shard, "bytes": (root / name).stat().st_size, "sha256": ""})
    px = np.concatenate(pixels, axis=1)
    stats = {
        "count": [px.shape[1]] * 3,
        "mean": px.mean(1).tolist(),
        "std": px.std(1).tolist(),
        "min": px.min(1).tolist(),
        "max": px.max(1).tolist(),
        "p2": np.percentile(px, 2, axis=1).tolist(),
        "p98": np.percentile(px, 98, axis=1).tolist(),
    }
    manifest = {
        "format": "geoexplora-shards/1",
        "converter": {"version": "tests", "args": {}},
        "shards": entries,
        "total_samples": n_shards * per_shard,
        "num_bands": 3,
        "band_names": ["red", "green", "blue"],
        "dtype": "uint8",
        "nodata": None,
        "classes": None,
        "stats": stats,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    return write_rgb_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """Base weights of the tiny preset's ViT, so adapters can be checked against a fixed base. Like a
    DINOv2 hub file they carry the iBOT mask token, which then lives on the ViT and trains: with the
    cls token, two trainable tensors used outside any submodule forward (the ZeRO-3 teacher case)."""
    import torch
    from safetensors.torch import save_file

    from engine.config import RunConfig, load_config
    from engine.model.vit import build_vit

    torch.manual_seed(123)
    vit = build_vit(load_config(RunConfig, str(TINY)).model)
    path = tmp_path_factory.mktemp("weights") / "tiny_base.safetensors"
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    sd["mask_token"] = torch.randn(1, vit.embed_dim) * 0.02
    save_file(sd, str(path))
    return path


def pretrain_command(*args: str) -> list[str]:
    """``deepspeed --num_gpus 2 launchers/pretrain.py --config tiny_cpu <args>``."""
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [
        deepspeed,
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(LAUNCHER),
        "--config",
        str(TINY),
        "--data.num_workers",
        "0",
        "--train.logger",
        "",
        "--objective.dino.warmup_teacher_temp_steps",
        "0",
        "--train.log_every",
        "1",
        *args,
    ]


def launch_env() -> dict:
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("RANK", None)
    return env


def run_pretrain(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        pretrain_command(*args), cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"pretrain failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def start_pretrain(*args: str, log: Path) -> subprocess.Popen:
    fh = open(log, "w")
    return subprocess.Popen(pretrain_command(*args), cwd=REPO, env=launch_env(), stdout=fh, stderr=subprocess.STDOUT)
