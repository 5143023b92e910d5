"""Metrics to Weights & Biases, offline unless the user says otherwise.

The mode is WANDB_MODE when set (online, offline, disabled), else ``offline``: the run is written
under ``<output_dir>/wandb`` and uploaded later, if wanted, with ``wandb sync <output_dir>/wandb``.
Project: WANDB_PROJECT or ``geoexplora``; run name: the run directory's name; the resolved config
is the run's config. The W&B run id is kept in ``<output_dir>/wandb_run_id``, so a resumed run
continues the same W&B run (steps redone after the last checkpoint are dropped by W&B, which only
accepts increasing steps; metrics.jsonl keeps them).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from engine.trainer.loggers import save_run_id, saved_run_id


class WandbLogger:
    def __init__(self, output_dir: Path, config: dict):
        import wandb

        rid = saved_run_id(output_dir, "wandb") or uuid.uuid4().hex[:12]
        save_run_id(output_dir, "wandb", rid)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "geoexplora",
            name=Path(output_dir).name,
            id=rid,
            resume="allow",
            dir=str(output_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE") or "offline",
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
