"""--train.logger tensorboard,wandb,mlflow: every logger gets the metrics of metrics.jsonl; wandb and
mlflow run against fake modules here (offline mode, a local store in the run directory, the run
id kept across a resume); a logger whose package is not installed is refused at config time."""

import sys
import types
from types import SimpleNamespace

import pytest

from engine.config import RunConfig, load_config
from engine.errors import UserError
from engine.trainer.metrics import read_metrics


class FakeWandb(types.ModuleType):
    """The part of the wandb API the logger uses: init(...) -> run with log/finish."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        return SimpleNamespace(
            log=lambda data, step: self.logged.append((step, dict(data))),
            finish=lambda: setattr(self, "finished", self.finished + 1),
        )


class FakeMlflowClient:
    """MlflowClient's methods the logger uses, recorded on the class (one store per test)."""

    calls: list = []
    metrics: list = []
    params: dict = {}

    def __init__(self, tracking_uri):
        self.calls.append(("client", tracking_uri))

    def get_experiment_by_name(self, name):
        self.calls.append(("get_experiment", name))
        return None

    def create_experiment(self, name, artifact_location):
        self.calls.append(("create_experiment", name, artifact_location))
        return "7"

    def create_run(self, experiment_id, run_name):
        self.calls.append(("create_run", experiment_id, run_name))
        return SimpleNamespace(info=SimpleNamespace(run_id="run-abc"))

    def update_run(self, run_id, status):
        self.calls.append(("update_run", run_id, status))

    def log_batch(self, run_id, metrics=(), params=()):
        assert run_id == "run-abc" and len(params) <= 100
        self.metrics += [(m.step, m.key, m.value) for m in metrics]
        self.params.update({p.key: p.value for p in params})

    def set_terminated(self, run_id):
        self.calls.append(("terminated", run_id))


@pytest.fixture
def fakes(monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    FakeMlflowClient.calls, FakeMlflowClient.metrics, FakeMlflowClient.params = [], [], {}
    mlflow = types.ModuleType("mlflow")
    tracking = types.ModuleType("mlflow.tracking")
    tracking.MlflowClient = FakeMlflowClient
    entities = types.ModuleType("mlflow.entities")
    entities.Metric = lambda key, value, timestamp, step: SimpleNamespace(key=key, value=value, step=step)
    entities.Param = lambda key, value: SimpleNamespace(key=key, value=value)
    for name, mod in (("mlflow", mlflow), ("mlflow.tracking", tracking), ("mlflow.entities", entities)):
        monkeypatch.setitem(sys.modules, name, mod)
    for var in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    return wandb, FakeMlflowClient


def _fit(env, out, steps, loggers="tensorboard,wandb,mlflow"):
    from engine.trainer.loop import Trainer
    from tests.engine.trainer.test_loop import Stream, ToyObjective, _cfg

    Trainer(
        _cfg(out, "--train.max_steps", str(steps), "--train.logger", loggers, "--train.save_every", "2"),
        ToyObjective(),
        Stream(),
        env,
    ).fit()


def test_every_logger_gets_the_metrics_and_a_resume_continues_the_run(single_rank_env, tmp_path, fakes):
    wandb, client = fakes
    _fit(single_rank_env, tmp_path, 2)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    init = wandb.inits[0]
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path) and init["project"] == "geoexplora"
    assert init["id"] == (tmp_path / "wandb_run_id").read_text().strip() and init["config"]["train"]["max_steps"] == 2
    assert [(s, d["train/mse"], d["train/lr"]) for s, d in wandb.logged] == [
        (r["step"], r["mse"], r["lr"]) for r in rows
    ]
    assert wandb.finished == 1
    assert client.calls[0] == ("client", f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    assert ("create_experiment", "geoexplora", (tmp_path / "mlartifacts").resolve().as_uri()) in client.calls
    assert ("create_run", "7", tmp_path.name) in client.calls and client.calls[-1] == ("terminated", "run-abc")
    assert client.params["optim.lr"] == "0.05" and client.params["train.logger"] == "['tensorboard', 'wandb', 'mlflow']"
    assert [(s, v) for s, k, v in client.metrics if k == "train/mse"] == [(r["step"], r["mse"]) for r in rows]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())

    client.calls.clear()
    _fit(single_rank_env, tmp_path, 4)  # resumes from step 2 into the same W&B and MLflow runs
    assert wandb.inits[1]["id"] == init["id"] and [s for s, _ in wandb.logged[2:]] == [3, 4]
    assert ("update_run", "run-abc", "RUNNING") in client.calls
    assert not any(c[0] == "create_run" for c in client.calls)


def test_user_settings_win_over_the_offline_defaults(tmp_path, fakes, monkeypatch):
    from engine.trainer.loggers import open_loggers

    wandb, client = fakes
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_PROJECT", "fmow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    for logger in open_loggers(["wandb", "mlflow"], tmp_path, {"optim": {"lr": 0.1}}):
        logger.close()
    assert wandb.inits[0]["mode"] == "online" and wandb.inits[0]["project"] == "fmow"
    assert client.calls[0] == ("client", "http://127.0.0.1:5000")


def test_a_logger_without_its_package_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(UserError, match="--train.logger: mlflow: the mlflow package is not installed"):
        load_config(RunConfig, None, ["--train.logger", "tensorboard,mlflow"])
    with pytest.raises(UserError, match="expected one of"):
        load_config(RunConfig, None, ["--train.logger", "comet"])
    assert load_config(RunConfig, None, ["--train.logger", ""]).train.logger == []
