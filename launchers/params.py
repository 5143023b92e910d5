"""Print the ExPLoRA parameter report of a model without weights or training (sizing a run).

    python launchers/params.py --model vit_large_patch14_dinov2 --unfreeze-blocks -1 \\
        --lora-rank 64 --lora-targets q,v [--img-size 224] [--in-chans 3] [--json]

The architecture is built on the meta device (no memory, no weights; ViT-g in about a second), the
recipe applied, and the per-group table printed, with the trainable count without the cls/register
tokens beside it (ExPLoRA trains the cls token; ``--no-train-tokens`` freezes it). With ``--json``
the last line is one JSON object: ``trainable``, ``trainable_without_tokens``, ``frozen``,
``total``, ``trainable_pct``, ``groups`` ({group: {trainable, frozen, total}}), ``recipe`` and
``model``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

from engine.config import ExploraConfig, ModelConfig
from engine.errors import UserError, cli_entry
from engine.progress import setup_logging


def _ints(values: Sequence[str]) -> list[int]:
    out = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if not part or part.lower() == "none":
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise UserError(f"--unfreeze-blocks: expected block indices like -1 or 0,-1, got {part!r}") from None
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="vit_large_patch14_dinov2", help="architecture (see --model.name in configs)")
    recipe = ExploraConfig()
    p.add_argument(
        "--unfreeze-blocks",
        nargs="+",
        default=[str(b) for b in recipe.unfreeze_blocks],
        help="blocks trained fully, e.g. -1 or 0,-1 ('none' = no block)",
    )
    p.add_argument("--lora-rank", type=int, default=recipe.lora_rank)
    p.add_argument("--lora-alpha", type=float, default=None, help="default: the rank (scale 1)")
    p.add_argument(
        "--lora-targets", default=",".join(recipe.lora_targets), help="comma list of q,k,v,proj,fc1,fc2 ('' = no LoRA)"
    )
    p.add_argument("--img-size", type=int, default=ModelConfig.img_size)
    p.add_argument("--in-chans", type=int, default=ModelConfig.in_chans)
    p.add_argument(
        "--patch-embed",
        choices=("plain", "group"),
        default="plain",
        help="'group' = SatMAE group-channel embed (default groups need --in-chans 10)",
    )
    p.add_argument("--no-train-norms", action="store_true", help="freeze the LayerNorms")
    p.add_argument("--train-layerscale", action="store_true")
    p.add_argument("--train-patch-embed", action="store_true")
    p.add_argument("--train-pos-embed", action="store_true")
    p.add_argument(
        "--no-train-tokens",
        action="store_true",
        help="freeze the cls/register tokens (ExPLoRA's scripts train the cls token)",
    )
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    # argparse reads "-1" as a value (not an option) because no option here looks like a number
    return p.parse_args(argv)


def report_for(args: argparse.Namespace):
    """(ParamReport, ModelConfig) for the parsed arguments, built on the meta device."""
    from engine.model.explora import apply_explora
    from engine.model.vit import build_vit

    model = ModelConfig(name=args.model, img_size=args.img_size, in_chans=args.in_chans, patch_embed=args.patch_embed)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    explora = ExploraConfig(
        unfreeze_blocks=_ints(args.unfreeze_blocks),
        lora_rank=args.lora_rank,
        lora_alpha=float(args.lora_alpha if args.lora_alpha is not None else args.lora_rank),
        lora_targets=targets,
        train_norms=not args.no_train_norms,
        train_layerscale=args.train_layerscale,
        train_patch_embed=args.train_patch_embed,
        train_pos_embed=args.train_pos_embed,
        train_tokens=not args.no_train_tokens,
    )
    explora.validate()
    vit = build_vit(model, device="meta")
    return apply_explora(vit, explora), model


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(level=logging.WARNING)
    report, model = report_for(args)
    print(
        f"{args.model} @ {args.img_size}px, {args.in_chans} bands ({args.patch_embed} patch embed); "
        f"unfrozen blocks {report.recipe['unfrozen_block_indices']}, LoRA r={report.recipe['lora_rank']} "
        f"on {','.join(report.recipe['lora_targets']) or '-'}"
    )
    print(report.table())
    tokens = report.groups["tokens"].trainable
    without = report.trainable - tokens
    print(
        f"trainable {report.trainable:,} of {report.total:,} ({report.trainable / max(report.total, 1):.2%}); "
        f"{without:,} without the {tokens:,} cls/register-token parameters"
    )
    if args.json:
        out = report.as_dict()
        out["trainable_without_tokens"] = without
        out["model"] = {
            "name": model.name,
            "img_size": model.img_size,
            "in_chans": model.in_chans,
            "patch_embed": model.patch_embed,
        }
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    main()
