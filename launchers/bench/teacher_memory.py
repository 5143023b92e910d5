"""Teacher-memory report: shared-base EMA teacher vs a naive deep-copy teacher, per base model.

Builds each model on the meta device (no weights, no memory), applies the ExPLoRA recipe and adds
the DINO head(s), then counts the teacher state both ways (fp32). Prints a table, optionally writes
JSON::

    python -m launchers.bench.teacher_memory --models vit_large_patch14_dinov2 --json mem.json \\
        --explora.lora_rank 64 --objective.dino.head_n_prototypes 65536

Remaining ``--section.field value`` arguments are run-config overrides (explora.*, objective.dino.*).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from engine.config import RunConfig, load_config
from engine.errors import cli_entry
from engine.model.explora import apply_explora
from engine.model.vit import build_vit
from engine.objectives.dino_head import DINOHead
from engine.objectives.teacher import teacher_memory
from engine.progress import setup_logging
from launchers.bench import harness
from launchers.bench.harness import Column

DEFAULT_MODELS = ("vit_base_patch14_dinov2", "vit_large_patch14_dinov2", "vit_giant_patch14_dinov2")
MIB = 2**20


def memory_row(cfg: RunConfig, model_name: str) -> dict:
    """Teacher bytes for ``model_name`` with ``cfg``'s recipe and DINO head settings (meta device)."""
    vit = build_vit(dataclasses.replace(cfg.model, name=model_name, weights="", adapter=""), device="meta")
    logging.getLogger("engine.model.explora").setLevel(logging.WARNING)  # the per-group table is noise here
    apply_explora(vit, cfg.explora)
    d = cfg.objective.dino
    modules: dict[str, torch.nn.Module] = {"vit": vit}
    with torch.device("meta"):
        kw = dict(
            out_dim=d.head_n_prototypes,
            hidden_dim=d.head_hidden_dim,
            bottleneck_dim=d.head_bottleneck_dim,
            nlayers=d.head_nlayers,
        )
        modules["dino_head"] = DINOHead(vit.embed_dim, **kw)
        if d.ibot_separate_head:
            modules["ibot_head"] = DINOHead(vit.embed_dim, **kw)
    row = {"model": model_name, **teacher_memory(modules)}
    row["backbone_only"] = teacher_memory({"vit": vit})
    return row


COLUMNS = [
    Column("base", "model", left=True),
    Column("params", lambda r: r["total_params"] / 1e6, "{:.1f} M"),
    Column("trainable", lambda r: r["trainable_params"] / 1e6, "{:.1f} M"),
    Column("naive deep-copy teacher", lambda r: r["naive_bytes"] / MIB, "{:.1f} MiB"),
    Column("shared-base teacher", lambda r: r["shared_bytes"] / MIB, "{:.1f} MiB"),
    Column("saving", lambda r: 100 * r["saving"], "{:.1f} %"),
]


def format_table(rows: list[dict]) -> str:
    return harness.format_table(rows, COLUMNS, markdown=True)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    ap = harness.parser(__doc__, "python -m launchers.bench.teacher_memory")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated architecture names")
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config(RunConfig, None, overrides)
    record = harness.start("teacher_memory", {**vars(args), "overrides": overrides})
    rows = [memory_row(cfg, m) for m in harness.comma_list(args.models, "--models")]
    print(format_table(rows))
    harness.save(args.out, record, rows=rows)
    return 0


if __name__ == "__main__":
    main()
