"""Experiment loggers the metrics also go to (``--train.logger tensorboard,wandb,mlflow``).

metrics.jsonl is always written (``metrics.MetricsWriter``); each logger named in
``train.logger`` additionally receives every numeric metric as ``train/<key>`` / ``val/<key>`` at
its optimizer step. Each lives in its own module and imports its package only when chosen (the
config refuses a logger whose package is not installed). All of them work offline: TensorBoard
writes files, W&B runs in offline mode unless WANDB_MODE says otherwise, and MLflow writes a
SQLite store in the run directory unless MLFLOW_TRACKING_URI names another.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

LOGGERS = ("tensorboard", "wandb", "mlflow")


class ExperimentLogger(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Numeric metrics (``train/loss`` ...) of optimizer step ``step``."""

    def close(self) -> None:
        """Flush and end the run (a resumed run continues it)."""


def open_loggers(names: Sequence[str], output_dir: Path, config: dict) -> list[ExperimentLogger]:
    """One logger per distinct name in ``names``, writing for the run in ``output_dir``; ``config``
    is the resolved config (logged as hyper-parameters where the logger keeps them)."""
    out: list[ExperimentLogger] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            from engine.trainer.loggers.to_tensorboard import TensorBoardLogger

            out.append(TensorBoardLogger(output_dir))
        elif name == "wandb":
            from engine.trainer.loggers.to_wandb import WandbLogger

            out.append(WandbLogger(output_dir, config))
        elif name == "mlflow":
            from engine.trainer.loggers.to_mlflow import MlflowLogger

            out.append(MlflowLogger(output_dir, config))
        else:
            raise ValueError(f"unknown logger {name!r}; choose from {LOGGERS}")
    return out


def saved_run_id(output_dir: Path, name: str) -> str | None:
    """The ``name`` (wandb, mlflow) run id this run directory was logged under, if any: kept in
    ``<output_dir>/<name>_run_id`` so that a resumed run continues the same logged run."""
    path = Path(output_dir) / f"{name}_run_id"
    rid = path.read_text().strip() if path.is_file() else ""
    return rid or None


def save_run_id(output_dir: Path, name: str, rid: str) -> None:
    from engine.atomic import atomic_write_text

    atomic_write_text(Path(output_dir) / f"{name}_run_id", rid + "\n")
