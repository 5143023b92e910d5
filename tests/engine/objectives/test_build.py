"""build_objective: picks the objective and its settings from the run config."""

import logging

import pytest
import torch

from engine.config import RunConfig, load_config
from engine.errors import UserError
from engine.objectives import DinoObjective, MAEObjective, build_objective
from engine.objectives.teacher import ZERO3_REQUIREMENTS
from engine.trainer.collectives import all_reduce_sum, is_distributed, world_size

TINY_DINO = [
    "--objective.dino.head_n_prototypes",
    "32",
    "--objective.dino.head_hidden_dim",
    "16",
    "--objective.dino.head_bottleneck_dim",
    "8",
]


def test_dino_from_run_config_logs_scratch_heads(tiny_vit, caplog):
    cfg = load_config(
        RunConfig, None, TINY_DINO + ["--crops.num_global", "3", "--objective.dino.centering", "centering"]
    )
    with caplog.at_level(logging.INFO):
        obj = build_objective(cfg, tiny_vit(), total_steps=50, all_reduce=all_reduce_sum)
    assert isinstance(obj, DinoObjective) and obj.n_global == 3 and obj.total_steps == 50
    assert obj.dino_loss.centering == "centering"
    assert "from scratch" in caplog.text
    assert obj.zero_config_overrides(3) == ZERO3_REQUIREMENTS and obj.zero_config_overrides(2) == {}
    x = {"global_crops": torch.randn(6, 3, 42, 42)}
    loss, logs = obj(x, step=0)  # the trainer's collective is the identity without a process group
    assert torch.isfinite(loss) and not is_distributed() and world_size() == 1


def test_mae_from_objective_section(tiny_vit):
    cfg = load_config(
        RunConfig,
        None,
        [
            "--objective.name",
            "mae",
            "--objective.mae.decoder_embed_dim",
            "32",
            "--objective.mae.decoder_depth",
            "1",
            "--objective.mae.decoder_num_heads",
            "4",
            "--objective.mae.mask_ratio",
            "0.5",
        ],
    )
    obj = build_objective(cfg.objective, tiny_vit("mae", img_size=32), total_steps=10)
    assert isinstance(obj, MAEObjective) and obj.cfg.mask_ratio == 0.5
    assert obj.zero_config_overrides(3) == {}


def test_bad_settings_are_user_errors(tiny_vit):
    cfg = load_config(RunConfig, None, TINY_DINO)
    with pytest.raises(UserError, match="max_steps"):
        build_objective(cfg, tiny_vit(), total_steps=0)
    cfg = load_config(RunConfig, None, TINY_DINO + ["--crops.num_global", "1", "--crops.num_local", "0"])
    with pytest.raises(UserError, match="num_global"):
        build_objective(cfg, tiny_vit(), total_steps=10)
    with pytest.raises(UserError, match="sinkhorn_iterations"):
        load_config(RunConfig, None, ["--objective.dino.sinkhorn_iterations", "0"])
