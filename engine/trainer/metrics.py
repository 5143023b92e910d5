"""Training metrics: throughput, data-wait vs compute split, peak memory, MFU; JSONL + loggers.

``ThroughputMeter`` accumulates between two log points; ``MetricsWriter`` (rank 0 only) appends
one JSON object per record to ``<output_dir>/metrics.jsonl`` (a resumed run appends to the same
file, after a ``{"event": "resume"}`` line; steps redone after the last checkpoint appear twice,
the later record wins) and hands numeric values to the experiment loggers of ``train.logger``
(TensorBoard under ``<output_dir>/tb``, W&B, MLflow: ``engine/trainer/loggers``).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from engine.trainer.loggers import open_loggers

log = logging.getLogger(__name__)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated device memory (CUDA), else the process's peak resident set size, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


class ThroughputMeter:
    """Images/s (global and per device), step time split into data wait and compute, MFU.

    images_per_step: images per optimizer step over all ranks. flops_per_image: model FLOPs of one
    training image (``flops.training_flops_per_sample``); peak_flops: one device's peak FLOP/s
    (0 = no MFU). Data wait = time the loop blocked on the loader plus host->device transfer;
    compute = the rest of the wall time (exact on CUDA because ``snapshot`` synchronises).
    """

    def __init__(
        self,
        images_per_step: int,
        world_size: int,
        device: torch.device,
        flops_per_image: float = 0.0,
        peak_flops: float = 0.0,
    ):
        self.images_per_step, self.world_size, self.device = images_per_step, world_size, device
        self.flops_per_image, self.peak_flops = flops_per_image, peak_flops
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.t0, self.steps, self.wait = now, 0, 0.0

    def add_data_wait(self, seconds: float) -> None:
        self.wait += seconds

    def step_done(self) -> None:
        self.steps += 1

    def snapshot(self) -> dict:
        """Metrics since the previous snapshot; resets the interval."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        wall = max(now - self.t0, 1e-9)
        steps = max(self.steps, 1)
        ips = self.images_per_step * self.steps / wall
        out = {
            "images_per_s": ips,
            "images_per_s_per_device": ips / self.world_size,
            "step_time_s": wall / steps,
            "data_wait_s": self.wait / steps,
            "compute_s": max(wall - self.wait, 0.0) / steps,
            "data_wait_frac": min(self.wait / wall, 1.0),
            "peak_mem_gb": peak_memory_gb(self.device),
        }
        if self.peak_flops > 0 and self.flops_per_image > 0:
            out["mfu"] = ips / self.world_size * self.flops_per_image / self.peak_flops
        self._reset(now)
        return out


class MetricsWriter:
    """Append-only JSONL (+ experiment loggers) metrics of one run directory. Disabled = every call is a no-op.

    loggers: names from ``engine.trainer.loggers.LOGGERS`` (``train.logger``); config: the resolved
    run config as a dict, for the loggers that record hyper-parameters.
    """

    def __init__(
        self,
        output_dir: Path,
        enabled: bool = True,
        loggers: Sequence[str] = ("tensorboard",),
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._fh = None
        self._loggers: list = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)
        self._loggers = open_loggers(loggers, Path(output_dir), config or {})

    def write(self, step: int, record: dict, prefix: str = "train/") -> None:
        """One record at optimizer step ``step`` (JSON line; numeric values also to the loggers)."""
        if not self.enabled:
            return
        self._line({"step": step, "time": round(time.time(), 3), **record})
        scalars = {
            prefix + k: float(v)
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        for logger in self._loggers:
            logger.log(step, scalars)

    def event(self, name: str, step: int, **info) -> None:
        """A non-metric line (resume, preemption, halt) in the JSONL."""
        if self.enabled:
            self._line({"event": name, "step": step, "time": round(time.time(), 3), **info})

    def _line(self, row: dict) -> None:
        if self._fh is None:
            raise RuntimeError(f"{self.path}: metrics written after close()")
        self._fh.write(json.dumps(row, default=_json_default) + "\n")

    def close(self) -> None:
        for logger in self._loggers:
            logger.close()
        self._loggers = []
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _json_default(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, Path):
        return str(v)
    return repr(v)


def read_metrics(path: Path) -> list[dict]:
    """Metric records (events skipped) of a metrics.jsonl; for each step the last record wins."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if "event" not in row:
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def format_metrics(record: dict, keys: list[str] | None = None) -> str:
    """Compact human line: ``loss 3.21 lr 0.00012 ... images_per_s 850``."""
    keys = keys or ["loss", "lr", "grad_norm", "images_per_s", "data_wait_frac", "mfu", "peak_mem_gb"]
    return " ".join(f"{k} {record[k]:.3g}" for k in keys if isinstance(record.get(k), float))
