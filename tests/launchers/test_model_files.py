"""The shipped presets name weight files users do not have yet: ``--print-config`` of every preset
works without overrides, while a real run (or a preflight) still stops at the launcher's input check,
before any process group, with one line naming the flag, and exit 2."""

import pytest
import torch.distributed as dist
import yaml

from engine.config import RunConfig, load_config, to_dict
from engine.eval.config import FinetuneRunConfig
from engine.presets import preset_names
from launchers import evaluate, finetune, pretrain


def _missing_weights(path: str) -> str:
    return f"error: --model.weights: file '{path}' not found; give a local .safetensors/.pth file or '' for random init"


MISSING_WEIGHTS = _missing_weights("weights/dinov2_vitb14_pretrain.pth")


def _launcher(preset: str):
    return (finetune, FinetuneRunConfig) if preset.startswith("finetune_") else (pretrain, RunConfig)


@pytest.mark.parametrize("preset", preset_names())
def test_print_config_of_every_preset_needs_no_files(preset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the presets' relative weight paths resolve to nothing here
    launcher, cls = _launcher(preset)
    with pytest.raises(SystemExit) as e:
        launcher.main(["--config", preset, "--print-config"])
    assert e.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out) == to_dict(load_config(cls, preset))


def test_evaluate_prints_a_config_naming_missing_files(tmp_path, capsys):
    argv = ["--model.weights", str(tmp_path / "base.pth"), "--model.adapter", str(tmp_path / "a.safetensors")]
    with pytest.raises(SystemExit) as e:
        evaluate.main([*argv, "--print-config"])
    assert e.value.code == 0 and yaml.safe_load(capsys.readouterr().out)["model"]["weights"] == argv[1]


@pytest.mark.parametrize(
    "launcher, argv, line",
    [
        (pretrain, ["--config", "explora_dinov2_vitb14_fmow_rgb"], MISSING_WEIGHTS),
        (pretrain, ["--config", "explora_dinov2_vitb14_fmow_rgb", "--preflight"], MISSING_WEIGHTS),
        (
            finetune,
            ["--config", "finetune_tiny_cpu", "--model.adapter", "adapter.safetensors"],
            "error: --model.adapter: file 'adapter.safetensors' not found",
        ),
        (
            finetune,
            ["--config", "finetune_tiny_cpu", "--model.weights", "base.pth", "--preflight"],
            _missing_weights("base.pth"),
        ),
        (evaluate, ["--model.name", "tiny", "--model.weights", "base.pth"], _missing_weights("base.pth")),
    ],
    ids=["pretrain", "pretrain-preflight", "finetune-adapter", "finetune-preflight", "evaluate"],
)
def test_a_run_checks_the_model_files_first(launcher, argv, line, tmp_path, monkeypatch, capsys):
    """No shards, no output directory given: the missing file is what the run reports."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        launcher.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert not (dist.is_available() and dist.is_initialized())
