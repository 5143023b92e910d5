import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config_cli import split_config_arg
from engine.errors import UserError
from engine.trainer.launch import strip_launcher_args, take_preflight_flag

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


def test_take_preflight_flag_forms():
    plain = ["--config", "x.yaml", "--data.batch_size", "4"]
    assert take_preflight_flag(plain) == (plain, 0)
    assert take_preflight_flag(["--preflight", "--config", "x.yaml"]) == (["--config", "x.yaml"], 1)
    assert take_preflight_flag(["--config", "x.yaml", "--preflight=3"]) == (["--config", "x.yaml"], 3)
    assert take_preflight_flag(["--preflight", "2", "--zero.stage", "3"]) == (["--zero.stage", "3"], 2)
    with pytest.raises(UserError, match="--preflight"):
        take_preflight_flag(["--preflight=0"])
    with pytest.raises(UserError, match="--preflight"):
        take_preflight_flag(["--preflight=many"])


REPO = Path(__file__).resolve().parents[3]
# Runs each launcher's --help and --print-config in a fresh interpreter, then reports whether torch was imported.
_HELP_WITHOUT_TORCH = """
import contextlib, io, sys
from launchers import evaluate, finetune, pretrain
for main, argv in ((pretrain.main, ["--help"]), (pretrain.main, ["--config", "tiny_cpu", "--print-config"]),
                   (finetune.main, ["--help"]), (evaluate.main, ["--print-config"])):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)
print("torch" in sys.modules)
"""


def test_help_and_print_config_do_not_import_torch():
    """--help and --print-config answer before torch loads (seconds of import on a cold start)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    got = subprocess.run(
        [sys.executable, "-c", _HELP_WITHOUT_TORCH], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.strip() == "False", got.stdout
