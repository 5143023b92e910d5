from pathlib import Path

import pytest

from engine.errors import UserError
from engine.trainer.process_group import strip_launcher_args
from engine.config_cli import split_config_arg

TINY = str(Path(__file__).resolve().parents[3] / "engine" / "presets" / "tiny_cpu.yaml")


def test_deepspeed_local_rank_is_dropped():
    assert strip_launcher_args(["--local_rank=1", "--zero.stage", "3"]) == ["--zero.stage", "3"]
    assert strip_launcher_args(["--local_rank", "0", "--train.max_steps", "5"]) == ["--train.max_steps", "5"]


def test_config_flag_split():
    assert split_config_arg(["--config", "c.yaml", "--zero.stage", "2"]) == ("c.yaml", ["--zero.stage", "2"])
    assert split_config_arg(["--config=c.yaml"]) == ("c.yaml", [])
    assert split_config_arg(["--train.max_steps", "3"]) == (None, ["--train.max_steps", "3"])
    with pytest.raises(UserError, match="--config"):
        split_config_arg(["--config"])


@pytest.mark.parametrize("extra, needle", [
    (["--data.shards", "/no/such/shards"], "--data.shards"),
    (["--data.shards", "/tmp", "--model.name", "vit_nope"], "--model.name"),
    (["--data.shards", "/tmp", "--zero.stage", "5"], "--zero.stage"),
])
def test_bad_inputs_fail_before_any_process_group(extra, needle, capsys):
    import torch.distributed as dist

    from launchers.pretrain import main

    with pytest.raises(SystemExit) as e:
        main(["--config", TINY, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not (dist.is_available() and dist.is_initialized())


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
        apply_kernel_config(load_config(RunConfig, None, ["--kernels.lora", "reference",
                                                          "--kernels.attention", "reference"]))
        assert dispatch.requested_backend("lora_linear") == "reference"
        assert dispatch.requested_backend("attention") == "reference"
        monkeypatch.setenv("GEOEXPLORA_ATTENTION", "sdpa")  # the environment wins over the config
        assert dispatch.requested_backend("attention") == "sdpa"
    finally:
        apply_kernel_config(load_config(RunConfig, None, []))
    assert dispatch.requested_backend("lora_linear") == "auto"
