"""Image sizes are checked against the model's patch size at config time, before any model or data
is built: one error line naming the flag, the model and the nearest valid size; exit 2 from the CLI."""

from pathlib import Path

import pytest
import torch

from engine.config import RunConfig, load_config
from engine.errors import UserError
from engine.eval.config import EvalRunConfig, FinetuneRunConfig
from engine.model_names import TINY_ARCHS, patch_size_of

L14 = "vit_large_patch14_dinov2"
REPO = Path(__file__).resolve().parents[2]


def test_plain_defaults_are_valid():
    cfg = load_config(RunConfig)  # what launchers/pretrain.py runs without --config
    p = patch_size_of(cfg.model.name)
    assert cfg.crops.global_size % p == 0 and cfg.crops.local_size % p == 0 and cfg.model.img_size % p == 0
    load_config(FinetuneRunConfig)
    load_config(EvalRunConfig)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--model.name", L14, "--crops.local_size", "96"],
            f"--crops.local_size 96: not a multiple of patch size 14 ({L14}); use 98",
        ),
        (
            ["--model.name", L14, "--crops.global_size", "220"],
            f"--crops.global_size 220: not a multiple of patch size 14 ({L14}); use 224",
        ),
        (
            ["--model.name", "vit_large_patch16_224", "--objective.name", "mae", "--crops.global_size", "100"],
            "--crops.global_size 100: not a multiple of patch size 16 (vit_large_patch16_224); use 96",
        ),
        (
            ["--model.name", "tiny", "--model.img_size", "50"],
            "--model.img_size 50: not a multiple of patch size 14 (tiny)",
        ),
    ],
)
def test_bad_size_names_flag_model_and_fix(argv, message):
    with pytest.raises(UserError) as e:
        load_config(RunConfig, None, argv)
    assert str(e.value).startswith(message)


def test_unused_sizes_are_not_checked():
    # MAE has no local crops; DINO without local crops ignores their size
    load_config(
        RunConfig,
        None,
        ["--model.name", "vit_large_patch16_224", "--objective.name", "mae", "--crops.local_size", "98"],
    )
    load_config(RunConfig, None, ["--crops.num_local", "0", "--crops.local_size", "96"])


def test_finetune_and_eval_sizes():
    with pytest.raises(UserError, match=r"^--model.img_size 200: not a multiple of patch size 16"):
        load_config(FinetuneRunConfig, None, ["--model.name", "vit_base_patch16_224", "--model.img_size", "200"])
    with pytest.raises(UserError, match=r"^--model.img_size 230: not a multiple of patch size 14 .*use 224"):
        load_config(EvalRunConfig, None, ["--model.name", L14, "--model.img_size", "230"])


def test_patch_size_from_name_matches_the_built_model():
    from engine.config import ModelConfig
    from engine.model.architecture import DINOV2_ARCHS, MAE_ARCHS
    from engine.model.vit import build_vit

    for name in DINOV2_ARCHS + MAE_ARCHS + tuple(TINY_ARCHS):
        vit = build_vit(ModelConfig(name=name, img_size=112), device="meta")
        assert patch_size_of(name) == vit.patch_embed.patch_size[0], name
        assert not any(t.device != torch.device("meta") for t in vit.parameters())


def test_cli_prints_one_line_and_exits_2(capsys):
    from launchers.pretrain import main

    with pytest.raises(SystemExit) as e:
        main(
            [
                "--config",
                str(REPO / "engine/presets/explora_dinov2_vitl14_fmow_rgb.yaml"),
                "--crops.local_size",
                "96",
                "--model.weights",
                "",
                "--data.shards",
                "/no/shards",
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: --crops.local_size 96: not a multiple of patch size 14 ({L14}); use 98"
