from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from engine.config import RunConfig, describe, load_config, parse_overrides, save_config, to_dict
from engine.errors import UserError


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"data": {"batch_size": 8}, "optim": {"lr": 0.5}}))
    cfg = load_config(
        RunConfig,
        str(p),
        [
            "--data.batch_size",
            "64",
            "--explora.lora_targets",
            "q,k,v",
            "--optim.betas=[0.8,0.95]",
            "--zero.stage",
            "3",
            "--model.grad_checkpointing",
        ],
    )
    assert cfg.data.batch_size == 64 and cfg.optim.lr == 0.5
    assert cfg.explora.lora_targets == ["q", "k", "v"]
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.zero.stage == 3 and cfg.model.grad_checkpointing is True


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--data.batch_size", "abc"], "--data.batch_size: expected int"),
        (["--data.batch_size", "0"], "--data.batch_size: must be > 0"),
        (["--zero.stage", "4"], "--zero.stage"),
        (["--data.nope", "1"], "--data.nope: unknown option"),
        (["--objective.name", "simclr"], "--objective.name: expected one of"),
        (["--explora.lora_targets", "q,x"], "--explora.lora_targets"),
        (["stray"], "unexpected argument"),
    ],
)
def test_errors_name_the_field(argv, needle):
    with pytest.raises(UserError) as e:
        load_config(RunConfig, None, argv)
    assert needle in str(e.value)


def test_missing_model_files_parse_and_fail_the_file_check():
    """Presets name weight files users get later: a config naming a missing file parses (for
    --print-config); the launchers' input check and build_vit refuse it (ModelConfig.check_files)."""
    cfg = load_config(RunConfig, None, ["--model.weights", "/no/such.pth", "--model.adapter", "/no/a.safetensors"])
    with pytest.raises(UserError, match="^--model.weights: file '/no/such.pth' not found"):
        cfg.model.check_files()
    cfg.model.weights = ""
    with pytest.raises(UserError, match="^--model.adapter: file '/no/a.safetensors' not found$"):
        cfg.model.check_files()


def test_missing_preset():
    with pytest.raises(UserError, match="--config"):
        load_config(RunConfig, "/no/such.yaml")


def test_roundtrip(tmp_path):
    cfg = load_config(RunConfig, None, ["--train.max_steps", "7", "--crops.local_scale", "0.1,0.2"])
    save_config(cfg, tmp_path / "r.yaml")
    again = load_config(RunConfig, str(tmp_path / "r.yaml"))
    assert to_dict(again) == to_dict(cfg)
    assert again.crops.local_scale == (0.1, 0.2)


def test_parse_overrides_nesting():
    assert parse_overrides(["--a.b.c", "1", "--a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_every_field_documented():
    from engine.eval.config import EvalRunConfig, FinetuneRunConfig

    undocumented = [
        name for cls in (RunConfig, FinetuneRunConfig, EvalRunConfig) for name, _, doc in describe(cls) if not doc
    ]
    assert not undocumented, undocumented


@dataclass
class _Switches:
    mode: Literal["auto", "on", "off"] = "auto"
    """A literal whose choices are YAML 1.1 boolean words."""
    name: str = ""
    """A free string."""
    flag: bool = True
    """A boolean."""
    maybe: bool | None = None
    """An optional boolean."""


@pytest.mark.parametrize("word, flag", [("off", False), ("on", True), ("no", False), ("yes", True)])
def test_yaml_11_boolean_words_reach_strings_and_literals_as_written(tmp_path, word, flag):
    """``--mode off`` is the literal "off" (YAML 1.1 made it False: "expected one of [...], got False"),
    ``--name no`` the string "no" (it was "False"); bool fields still read every spelling."""
    cfg = load_config(_Switches, None, ["--name", word, "--flag", word, "--maybe", word])
    assert (cfg.name, cfg.flag, cfg.maybe) == (word, flag, flag)
    if word in ("on", "off"):
        assert load_config(_Switches, None, ["--mode", word]).mode == word
        preset = tmp_path / "switches.yaml"
        preset.write_text(f"mode: {word}\nname: {word}\nflag: {word}\n")
        cfg = load_config(_Switches, str(preset))
        assert (cfg.mode, cfg.name, cfg.flag) == (word, word, flag)
    # YAML 1.2's own booleans reach a string field as the word (they were "False"/"True")
    assert load_config(_Switches, None, ["--name", "false"]).name == "false"
    with pytest.raises(UserError, match=r"--mode: expected one of \['auto', 'on', 'off'\], got 'maybe'"):
        load_config(_Switches, None, ["--mode", "maybe"])
