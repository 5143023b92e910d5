"""Metrics to TensorBoard event files in ``<output_dir>/tb`` (``tensorboard --logdir runs``)."""

from __future__ import annotations

from pathlib import Path


class TensorBoardLogger:
    def __init__(self, output_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(output_dir) / "tb"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()
