"""launchers/bench/teacher_memory.py: the counts with the real recipe, and its command on the harness."""

import json

from engine.config import DinoConfig, ExploraConfig, ModelConfig, RunConfig
from engine.model.explora import apply_explora
from engine.model.vit import build_vit
from launchers.bench.teacher_memory import format_table, main, memory_row

HEAD = dict(head_n_prototypes=32, head_hidden_dim=16, head_bottleneck_dim=8)


def test_teacher_memory_report_with_the_real_recipe():
    cfg = RunConfig()
    cfg.objective.dino = DinoConfig(**HEAD)
    cfg.explora = ExploraConfig(lora_rank=4)
    row = memory_row(cfg, "tiny")
    report = apply_explora(build_vit(ModelConfig(name="tiny"), device="meta"), ExploraConfig(lora_rank=4))
    head_params = 64 * 16 + 16 + 16 * 16 + 16 + 16 * 8 + 8 + 32 * 8 + 32  # MLP 64-16-16-8 + 32 prototypes + gains
    assert row["backbone_only"]["trainable_params"] == report.trainable
    assert row["trainable_params"] == report.trainable + head_params
    assert row["total_params"] == report.total + head_params
    assert row["shared_bytes"] == 4 * row["trainable_params"] < row["naive_bytes"] == 4 * row["total_params"]
    assert "| tiny |" in format_table([row])


def test_command_writes_the_rows_and_passes_config_overrides(tmp_path, capsys):
    out = tmp_path / "mem.json"
    assert (
        main(
            [
                "--models",
                "tiny",
                "--json",
                str(out),
                "--explora.lora_rank",
                "4",
                "--objective.dino.head_n_prototypes",
                "32",
                "--objective.dino.head_hidden_dim",
                "16",
                "--objective.dino.head_bottleneck_dim",
                "8",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    cfg = RunConfig()
    cfg.objective.dino = DinoConfig(**HEAD)
    cfg.explora = ExploraConfig(lora_rank=4)
    assert result["rows"] == [memory_row(cfg, "tiny")]
    assert result["benchmark"] == "teacher_memory" and result["settings"]["models"] == "tiny"
    assert "--explora.lora_rank" in result["settings"]["overrides"]
    assert "| tiny |" in capsys.readouterr().out
