"""--deepspeed.config FILE: merged over the generated DeepSpeed config, conflicting keys refused with
one line naming them, DeepSpeed's own parser run before any process group, saved in the run dir."""

import json

import pytest
import yaml

from engine.config import RunConfig, load_config
from engine.errors import UserError
from engine.trainer.deepspeed_setup import build_ds_config
from engine.trainer.ds_user_config import check_user_config


def _cfg(tmp_path, user: dict, *extra, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(user) if name.endswith(".json") else yaml.safe_dump(user))
    return load_config(RunConfig, "tiny_cpu", ["--deepspeed.config", str(path), *extra])


def test_new_keys_are_merged(tmp_path):
    cfg = _cfg(
        tmp_path,
        {"zero_optimization": {"round_robin_gradients": True}, "comms_logger": {"enabled": False}},
        "--zero.stage",
        "2",
        name="ds.yaml",
    )
    check_user_config(cfg)
    ds = build_ds_config(cfg, 2, "cpu")
    assert ds["zero_optimization"]["round_robin_gradients"] is True and ds["zero_optimization"]["stage"] == 2
    assert ds["comms_logger"] == {"enabled": False} and ds["train_batch_size"] == 2 * cfg.data.batch_size


@pytest.mark.parametrize(
    "user, needle",
    [
        ({"zero_optimization": {"stage": 3}}, "'zero_optimization.stage' conflicts with --zero.stage"),
        ({"train_micro_batch_size_per_gpu": 4}, "conflicts with --data.batch_size"),
        ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, "'optimizer.type' conflicts with --optim"),
        ({"bf16": {"enabled": True}}, "conflicts with --train.precision"),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "--zero.offload_optimizer"),
        ({"steps_per_print": 10}, "'steps_per_print' is set by geoexplora"),
        ({"zero_optimization": 2}, "'zero_optimization' conflicts with 'zero_optimization.stage'"),
    ],
)
def test_conflicting_keys_are_refused_naming_the_key(tmp_path, user, needle):
    cfg = _cfg(tmp_path, user, "--zero.stage", "2")
    with pytest.raises(UserError, match="--deepspeed.config") as e:
        check_user_config(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError):  # the trainer's own merge refuses the same file
        build_ds_config(cfg, 1, "cpu")


def test_teacher_requirements_are_reserved_at_zero3(tmp_path):
    user = {"zero_optimization": {"stage3_param_persistence_threshold": 100000}}
    with pytest.raises(UserError, match="shared-base EMA teacher"):
        check_user_config(_cfg(tmp_path, user, "--zero.stage", "3"))
    check_user_config(_cfg(tmp_path, user, "--zero.stage", "3", "--objective.name", "mae"))


def test_deepspeed_validates_the_merged_config(tmp_path):
    with pytest.raises(UserError, match="DeepSpeed rejects the merged config: .*round_robin_gradientz"):
        check_user_config(_cfg(tmp_path, {"zero_optimization": {"round_robin_gradientz": True}}, "--zero.stage", "2"))


def test_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="--deepspeed.config: file '/no/such.json' not found"):
        load_config(RunConfig, None, ["--deepspeed.config", "/no/such.json"])
    bad = tmp_path / "bad.json"
    bad.write_text("{'zero_optimization': ")
    with pytest.raises(UserError, match="not valid JSON"):
        check_user_config(load_config(RunConfig, None, ["--deepspeed.config", str(bad)]))
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="must hold a mapping"):
        check_user_config(load_config(RunConfig, None, ["--deepspeed.config", str(bad)]))


def test_trainer_runs_with_it_and_saves_the_merged_config(single_rank_env, tmp_path):
    from engine.trainer.loop import Trainer
    from tests.engine.trainer.test_loop import Stream, ToyObjective
    from tests.engine.trainer.test_loop import _cfg as toy_cfg

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"round_robin_gradients": True}}))
    cfg = toy_cfg(tmp_path / "run", "--train.max_steps", "1", "--zero.stage", "1", "--deepspeed.config", str(user))
    trainer = Trainer(cfg, ToyObjective(), Stream(), single_rank_env)
    trainer.fit()
    assert trainer.engine.zero_round_robin_gradients() is True
    saved = json.loads((tmp_path / "run" / "deepspeed_config.json").read_text())
    assert saved["zero_optimization"]["round_robin_gradients"] is True and saved["zero_optimization"]["stage"] == 1
