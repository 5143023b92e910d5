"""Frozen-feature evaluation: linear probe (lr grid picked on val) and weighted kNN (k=20, T=0.07)
of a backbone, on cls and cls + mean-patch features; top-1/top-5, or mAP for multi-label data.

    geoexplora-evaluate --model.name vit_large_patch14_dinov2 --model.weights dinov2_vitl14.pth \\
        --model.adapter runs/vitl_fmow/export/teacher_adapter.safetensors \\
        --data.shards /data/fmow/shards --eval.output_dir runs/vitl_fmow/eval
    torchrun --nproc_per_node 8 -m launchers.evaluate ...   # feature extraction split over ranks

``--data.shards`` holds one sub-directory per split (``--eval.splits train,val[,test]``; the test
split, when given, is only ever scored with the lr chosen on val). Features are cached in
``<eval.output_dir>/features/`` and reused while model and data are unchanged; results go to
``results.json`` and ``results.txt``. Exit codes: 0 done, 2 bad config/path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from engine.errors import UserError, cli_entry
from engine.eval.config import EvalRunConfig
from engine.trainer.launch import check_output_dir, exit_fast, run_cli


def check_inputs(cfg: EvalRunConfig) -> None:
    from engine.data import resolve_shards
    from engine.model.architecture import resolve_arch

    cfg.model.check_files()
    resolve_arch(cfg.model.name)
    if not cfg.data.shards:
        raise UserError("--data.shards: not set; give the directory holding the split sub-directories")
    for split in cfg.eval.splits:
        if not (Path(cfg.data.shards) / split).is_dir():
            raise UserError(f"--data.shards '{cfg.data.shards}': no '{split}' sub-directory (see --eval.splits)")
        resolve_shards(str(Path(cfg.data.shards) / split), "")
    check_output_dir(cfg)


def run(cfg: EvalRunConfig, env) -> int:
    from engine.eval.frozen import evaluate_frozen

    evaluate_frozen(cfg, env)  # logs the results table and writes results.json / results.txt
    return 0


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(EvalRunConfig, argv, run, check_inputs, __doc__)


def console() -> None:
    """``geoexplora-evaluate``: :func:`main`, then a fast exit."""
    exit_fast(main())


if __name__ == "__main__":
    console()
