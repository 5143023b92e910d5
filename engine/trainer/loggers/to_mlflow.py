"""Metrics to MLflow: a SQLite store ``<output_dir>/mlflow.db`` unless MLFLOW_TRACKING_URI names
another store or server (``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db`` shows it;
MLflow 3 refuses its old ./mlruns file store by default).

Experiment: MLFLOW_EXPERIMENT_NAME or ``geoexplora``; run name: the run directory's name. The
resolved config is logged once as dotted params (``optim.lr``); the MLflow run id is kept in
``<output_dir>/mlflow_run_id``, so a resumed run continues the same MLflow run. A client object
is used, not mlflow's module-level active run, so the caller's own MLflow state is left alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from engine.trainer.loggers import save_run_id, saved_run_id

MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
MAX_PARAM_CHARS = 500  # the longest param value every MLflow version accepts


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}``, values cut to MAX_PARAM_CHARS."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:MAX_PARAM_CHARS]
    return out


class MlflowLogger:
    def __init__(self, output_dir: Path, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        out = Path(output_dir).resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        rid = saved_run_id(output_dir, "mlflow")
        if rid is not None:  # a resumed run: continue it (its params are already logged)
            self.client.update_run(rid, status="RUNNING")
            self.run_id = rid
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "geoexplora"
        exp = self.client.get_experiment_by_name(name)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else self.client.create_experiment(name, artifact_location=(out / "mlartifacts").as_uri())
        )
        self.run_id = self.client.create_run(exp_id, run_name=Path(output_dir).name).info.run_id
        save_run_id(output_dir, "mlflow", self.run_id)
        params = [Param(k, v) for k, v in flat_params(config).items()]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_PER_BATCH])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
