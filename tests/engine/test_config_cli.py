"""The launchers' command line: presets by name, --help generated from the config dataclasses,
--print-config round-tripping through --config, one-line errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.config import RunConfig, load_config, to_dict
from engine.config_cli import format_default, help_text, parse_config_args, split_config_arg, type_name
from engine.config_io import sections
from engine.errors import UserError
from engine.eval.config import EvalRunConfig, FinetuneRunConfig
from engine.presets import PRESET_DIR, preset_names, resolve_preset

REPO = Path(__file__).resolve().parents[2]


def test_presets_by_name_or_path(tmp_path, monkeypatch):
    assert {"explora_dinov2_vitl14_fmow_rgb", "tiny_cpu", "finetune_tiny_cpu"} <= set(preset_names())
    assert resolve_preset("tiny_cpu") == resolve_preset("tiny_cpu.yaml") == PRESET_DIR / "tiny_cpu.yaml"
    by_name = load_config(RunConfig, "explora_dinov2_vitl14_fmow_rgb", ["--model.weights", ""])
    by_path = load_config(RunConfig, str(PRESET_DIR / "explora_dinov2_vitl14_fmow_rgb.yaml"), ["--model.weights", ""])
    assert to_dict(by_name) == to_dict(by_path)
    monkeypatch.chdir(tmp_path)  # a file in the working directory wins over a preset of that name
    Path("tiny_cpu").write_text(yaml.safe_dump({"train": {"max_steps": 3}}))
    assert load_config(RunConfig, "tiny_cpu").train.max_steps == 3
    with pytest.raises(UserError, match=r"^--config: 'nope' is neither a YAML file nor a preset; presets: .*tiny_cpu"):
        load_config(RunConfig, "nope")
    with pytest.raises(UserError, match="needs a preset name or a YAML path"):
        split_config_arg(["--config", "--zero.stage", "2"])


@pytest.mark.parametrize("cls", [RunConfig, FinetuneRunConfig, EvalRunConfig])
def test_help_lists_every_field_with_type_default_and_doc(cls):
    text = help_text(cls, "Launcher doc.")
    assert text.startswith("Launcher doc.") and "--print-config" in text and "tiny_cpu" in text
    flat = " ".join(text.split())
    for section, _, fields in sections(cls):
        assert f"\n{section}:" in text
        for f in fields:
            assert f"--{f.name} {type_name(f.type)}  (default: {format_default(f.default)})" in text
            assert " ".join(f.doc.split()) in flat


def test_type_and_default_rendering():
    from typing import Literal, Optional

    assert type_name(Literal["a", "b"]) == "{a,b}" and type_name(list[int] | None) == "list[int]|null"
    assert type_name(Optional[list[int]]) == "list[int]|null"  # noqa: UP045 - the typing spelling reads too
    assert type_name(tuple[float, float]) == "float,float" and type_name(list[str]) == "list[str]"
    assert [format_default(v) for v in ("", None, True, [-1], ["q", "v"], (0.9, 0.999), [], [[0, 1], [2]])] == [
        "''",
        "null",
        "true",
        "-1",
        "q,v",
        "0.9,0.999",
        "''",
        "[[0, 1], [2]]",
    ]
    # what --help shows as a default is what the command line accepts back
    cfg = load_config(
        RunConfig,
        None,
        [
            "--explora.lora_targets",
            format_default(["q", "v"]),
            "--optim.betas",
            format_default((0.9, 0.999)),
            "--data.bands",
            "null",
        ],
    )
    assert cfg.explora.lora_targets == ["q", "v"] and cfg.optim.betas == (0.9, 0.999) and cfg.data.bands is None


def test_none_words_set_optional_fields():
    assert load_config(RunConfig, None, ["--data.pin_memory", "None"]).data.pin_memory is None
    assert load_config(RunConfig, None, ["--data.pin_memory", "true"]).data.pin_memory is True


def test_print_config_round_trips(tmp_path, capsys):
    argv = ["--config", "tiny_cpu", "--zero.stage", "2", "--explora.lora_targets", "q,k,v", "--print-config"]
    with pytest.raises(SystemExit) as e:
        parse_config_args(RunConfig, argv)
    assert e.value.code == 0
    printed = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(printed)
    cfg = parse_config_args(RunConfig, ["--config", str(tmp_path / "resolved.yaml")])
    assert to_dict(cfg) == to_dict(load_config(RunConfig, "tiny_cpu", argv[2:6])) == yaml.safe_load(printed)


@pytest.mark.parametrize("launcher", ["pretrain", "finetune", "evaluate"])
def test_launcher_help(launcher, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"launchers.{launcher}").main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--data.shards str  (default: '')" in out and "--kernels.attention" in out
    assert re.search(r"^data:$", out, re.M)


def test_launcher_process_help_and_one_line_error():
    cmd = [sys.executable, str(REPO / "launchers" / "pretrain.py")]
    shown = subprocess.run([*cmd, "-h"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert shown.returncode == 0 and "--train.logger list[{tensorboard,wandb,mlflow}]" in shown.stdout
    bad = subprocess.run(
        [*cmd, "--config", "tiny_cpu", "--data.batch_size", "zero"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert bad.returncode == 2 and not bad.stdout
    assert bad.stderr.strip().splitlines() == ["error: --data.batch_size: expected int, got 'zero'"]
