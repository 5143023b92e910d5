import pytest

from engine.config_cli import split_config_arg
from engine.errors import UserError
from engine.trainer.process_group import strip_launcher_args

# Bad flags and values, one error line each, before any process group: tests/faults/test_runtime_faults.py


def test_deepspeed_local_rank_is_dropped():
    assert strip_launcher_args(["--local_rank=1", "--zero.stage", "3"]) == ["--zero.stage", "3"]
    assert strip_launcher_args(["--local_rank", "0", "--train.max_steps", "5"]) == ["--train.max_steps", "5"]


def test_config_flag_split():
    assert split_config_arg(["--config", "c.yaml", "--zero.stage", "2"]) == ("c.yaml", ["--zero.stage", "2"])
    assert split_config_arg(["--config=c.yaml"]) == ("c.yaml", [])
    assert split_config_arg(["--train.max_steps", "3"]) == (None, ["--train.max_steps", "3"])
    with pytest.raises(UserError, match="--config"):
        split_config_arg(["--config"])


def test_runner_options_after_the_script_are_dropped():
    # `deepspeed launchers/pretrain.py --num_gpus 8 ...` hands --num_gpus to the script
    assert strip_launcher_args(["--num_gpus", "8", "--zero.stage", "3"]) == ["--zero.stage", "3"]
    assert strip_launcher_args(["--num_nodes=2", "--train.max_steps", "5"]) == ["--train.max_steps", "5"]


def test_kernel_config_reaches_dispatch(monkeypatch):
    from engine.config import RunConfig, load_config
    from engine.trainer.launch import apply_kernel_config
    from kernels import dispatch

    for var in ("GEOEXPLORA_KERNELS", "GEOEXPLORA_ATTENTION"):
        monkeypatch.delenv(var, raising=False)
    try:
        apply_kernel_config(
            load_config(RunConfig, None, ["--kernels.lora", "reference", "--kernels.attention", "reference"])
        )
        assert dispatch.requested_backend("lora_linear") == "reference"
        assert dispatch.requested_backend("attention") == "reference"
        monkeypatch.setenv("GEOEXPLORA_ATTENTION", "sdpa")  # the environment wins over the config
        assert dispatch.requested_backend("attention") == "sdpa"
    finally:
        apply_kernel_config(load_config(RunConfig, None, []))
    assert dispatch.requested_backend("lora_linear") == "auto"
