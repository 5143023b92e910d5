"""The ExPLoRA recipe (arXiv 2406.10973) and its per-group parameter report.

Starting from a pre-trained ViT: the blocks in ``unfreeze_blocks`` train fully and get no LoRA;
every other block gets LoRA on ``lora_targets`` (q, k, v inside timm's fused ``qkv``; ``proj``,
``fc1``, ``fc2``); all LayerNorms train (``train_norms``); everything else is frozen, except what the
flags unfreeze (LayerScale, patch embed, position embedding, mask token; the cls/register tokens
train by default, as in ExPLoRA's launch scripts) and a patch embed that is new (``fresh``:
group-channel, or RGB kernels adapted to other bands).

``apply_explora(vit, cfg)`` or ``apply_explora(vit, unfreeze_blocks=(-1,), lora_rank=64, ...)``
returns a :class:`ParamReport` (trainable / frozen counts per group) and logs its table; the
resolved recipe stays on the model (:func:`applied_recipe`) for adapter files and exports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from engine.config import LORA_TARGETS, ExploraConfig
from engine.errors import UserError
from engine.model.lora import LoRALinear, is_lora_param, lora_modules

log = logging.getLogger(__name__)

GROUPS = (
    "unfrozen_blocks",
    "lora",
    "norms",
    "layerscale",
    "patch_embed",
    "pos_embed",
    "tokens",
    "block_weights",
    "other",
)
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def resolve_blocks(depth: int, blocks: Iterable[int]) -> list[int]:
    """Block indices (negative = from the end) -> sorted non-negative indices; UserError if out of range."""
    out = set()
    for b in blocks:
        i = int(b) + depth if int(b) < 0 else int(b)
        if not 0 <= i < depth:
            raise UserError(
                f"--explora.unfreeze_blocks: block {b} does not exist in a {depth}-block ViT "
                f"(valid: {-depth}..{depth - 1})"
            )
        out.add(i)
    return sorted(out)


def add_lora(
    vit: VisionTransformer, blocks: Iterable[int], targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0
) -> int:
    """Wrap ``targets`` of ``vit.blocks[i]`` for i in ``blocks`` with LoRALinear; returns layers wrapped.

    q/k/v share one LoRALinear on the fused ``attn.qkv`` with one output segment per target.
    """
    blocks = list(blocks)
    return add_lora_to_blocks([vit.blocks[i] for i in blocks], targets, rank, alpha, dropout, labels=blocks)


def add_lora_to_blocks(
    blocks: Sequence[nn.Module],
    targets: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    labels: Sequence[int] | None = None,
) -> int:
    """LoRA on ``targets`` of timm-style transformer blocks (``attn.qkv``, ``attn.proj``,
    ``mlp.fc1``, ``mlp.fc2``): the ViT's blocks, or the MAE decoder's. Returns layers wrapped."""
    bad = sorted(set(targets) - set(LORA_TARGETS))
    if bad:
        raise UserError(f"--explora.lora_targets: unknown target(s) {bad}; use any of {','.join(LORA_TARGETS)}")
    qkv_targets = [t for t in ("q", "k", "v") if t in targets]
    count = 0
    for i, blk in zip(labels if labels is not None else range(len(blocks)), blocks):
        attn, mlp = blk.get_submodule("attn"), blk.get_submodule("mlp")
        if qkv_targets:
            qkv = _linear(attn, "qkv", i)
            dim = qkv.out_features // 3
            attn.qkv = LoRALinear(
                qkv, rank, alpha, dropout, segments=["qkv".index(t) * dim for t in qkv_targets], segment_width=dim
            )
            count += 1
        for name, parent in (("proj", attn), ("fc1", mlp), ("fc2", mlp)):
            if name in targets:
                setattr(parent, name, LoRALinear(_linear(parent, name, i), rank, alpha, dropout))
                count += 1
    return count


def _linear(parent: nn.Module, name: str, block: int) -> nn.Linear:
    layer = getattr(parent, name)
    if not isinstance(layer, nn.Linear):
        raise UserError(
            f"--explora.lora_targets: {name} of block {block} is a {type(layer).__name__}, not a linear layer"
        )
    return layer


@dataclass
class GroupCount:
    trainable: int = 0
    total: int = 0

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


@dataclass
class ParamReport:
    """Parameter counts per group (each tensor in exactly one group), like PEFT's
    ``print_trainable_parameters`` but split by what trains. ``total`` includes the LoRA tensors."""

    groups: dict[str, GroupCount]
    recipe: dict = field(default_factory=dict)

    @property
    def trainable(self) -> int:
        return sum(g.trainable for g in self.groups.values())

    @property
    def total(self) -> int:
        return sum(g.total for g in self.groups.values())

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def as_dict(self) -> dict:
        return {
            "trainable": self.trainable,
            "frozen": self.frozen,
            "total": self.total,
            "trainable_pct": 100.0 * self.trainable / max(self.total, 1),
            "groups": {
                k: {"trainable": g.trainable, "frozen": g.frozen, "total": g.total}
                for k, g in self.groups.items()
                if g.total
            },
            "recipe": self.recipe,
        }

    def to_json(self) -> str:
        """One-line JSON of :meth:`as_dict`."""
        return json.dumps(self.as_dict(), sort_keys=False)

    def table(self) -> str:
        """Fixed-width table: group, trainable, frozen, total, trainable share of all parameters."""
        rows = [(k, g) for k, g in self.groups.items() if g.total]
        head = f"{'group':<16} {'trainable':>14} {'frozen':>15} {'total':>15} {'train %':>9}"
        lines = [head, "-" * len(head)]
        for k, g in rows + [("all", GroupCount(self.trainable, self.total))]:
            if k == "all":
                lines.append("-" * len(head))
            pct = 100.0 * g.trainable / max(self.total, 1)
            lines.append(f"{k:<16} {g.trainable:>14,} {g.frozen:>15,} {g.total:>15,} {pct:>8.2f}%")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def param_report(
    vit: VisionTransformer, unfrozen_blocks: Iterable[int] | None = None, recipe: dict | None = None
) -> ParamReport:
    """Count ``vit``'s parameters by group from their current ``requires_grad`` flags.

    unfrozen_blocks: non-negative block indices reported as 'unfrozen_blocks' (default: the recipe
    recorded by :func:`apply_explora`, else none). Works on meta-device models.
    """
    recipe = recipe if recipe is not None else getattr(vit, "geoexplora_recipe", {}) or {}
    unfrozen = set(unfrozen_blocks if unfrozen_blocks is not None else recipe.get("unfrozen_block_indices", []))
    kind: dict[str, str] = {}
    for mname, m in vit.named_modules():
        tag = "norms" if isinstance(m, NORM_TYPES) else "layerscale" if isinstance(m, LayerScale) else None
        if tag:
            for pname, _ in m.named_parameters(recurse=False):
                kind[f"{mname}.{pname}" if mname else pname] = tag
    groups = {g: GroupCount() for g in GROUPS}
    seen: set[int] = set()
    for name, p in vit.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts = name.split(".")
        if parts[0] == "blocks" and int(parts[1]) in unfrozen:
            g = "unfrozen_blocks"
        elif is_lora_param(name):
            g = "lora"
        elif name in kind:
            g = kind[name]
        elif parts[0] in ("patch_embed", "pos_embed"):
            g = parts[0]
        elif parts[0] in ("cls_token", "reg_token", "mask_token"):
            g = "tokens"
        elif parts[0] == "blocks":
            g = "block_weights"
        else:
            g = "other"
        groups[g].total += p.numel()
        groups[g].trainable += p.numel() if p.requires_grad else 0
    return ParamReport(groups, recipe)


def applied_recipe(vit: VisionTransformer) -> dict:
    """The recipe :func:`apply_explora` recorded on ``vit``; ValueError when none was applied."""
    recipe = getattr(vit, "geoexplora_recipe", None)
    if not recipe:
        raise ValueError("the model has no ExPLoRA recipe applied (call apply_explora first)")
    return recipe


def _as_config(cfg: ExploraConfig | dict | None, overrides: dict) -> ExploraConfig:
    if cfg is None:
        cfg = ExploraConfig()
    elif isinstance(cfg, dict):
        cfg = ExploraConfig(**cfg)
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ExploraConfig)})
        if unknown:
            raise TypeError(f"apply_explora() got unknown options {unknown}")
        cfg = dataclasses.replace(cfg, **overrides)
    cfg = dataclasses.replace(
        cfg, unfreeze_blocks=[int(b) for b in cfg.unfreeze_blocks], lora_targets=list(cfg.lora_targets)
    )
    cfg.validate()
    return cfg


def apply_explora(vit: VisionTransformer, cfg: ExploraConfig | dict | None = None, **overrides) -> ParamReport:
    """Freeze ``vit`` per the ExPLoRA recipe and add LoRA, in place; returns the parameter report.

    cfg: an :class:`~engine.config.ExploraConfig`, a dict of its fields, or None (defaults);
    keyword overrides take precedence (``unfreeze_blocks=(-1,)``, ``lora_rank=64``,
    ``lora_targets=("q", "v")``, ...). The resolved recipe is recorded as ``vit.geoexplora_recipe``
    for adapter files.
    """
    cfg = _as_config(cfg, overrides)
    if any(True for _ in lora_modules(vit)):
        raise ValueError("apply_explora(): the model already has LoRA layers (the recipe was applied before)")
    depth = len(vit.blocks)
    unfrozen = resolve_blocks(depth, cfg.unfreeze_blocks)
    for p in vit.parameters():
        p.requires_grad_(False)
    lora_blocks = [i for i in range(depth) if i not in unfrozen]
    if cfg.lora_targets:
        add_lora(vit, lora_blocks, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    for i in unfrozen:
        vit.blocks[i].requires_grad_(True)
    for m in vit.modules():
        if (cfg.train_norms and isinstance(m, NORM_TYPES)) or (cfg.train_layerscale and isinstance(m, LayerScale)):
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    if cfg.train_patch_embed or getattr(vit.patch_embed, "fresh", False):
        vit.patch_embed.requires_grad_(True)
    flags = (
        ("pos_embed", cfg.train_pos_embed),
        ("cls_token", cfg.train_tokens),
        ("reg_token", cfg.train_tokens),
        ("mask_token", cfg.train_mask_token),
    )
    for name, on in flags:
        t = getattr(vit, name, None)
        if isinstance(t, nn.Parameter):
            t.requires_grad_(on)
    recipe = dataclasses.asdict(cfg)
    recipe["unfrozen_block_indices"] = unfrozen
    recipe["depth"] = depth
    vit.geoexplora_recipe = recipe  # type: ignore[assignment]  # metadata: torch's stub wants a tensor or module
    report = param_report(vit, unfrozen, recipe)
    log.info(
        "ExPLoRA recipe: unfrozen blocks %s, LoRA r=%d on %s; %s/%s parameters train (%.2f%%)\n%s",
        unfrozen,
        cfg.lora_rank,
        ",".join(cfg.lora_targets) or "-",
        f"{report.trainable:,}",
        f"{report.total:,}",
        100.0 * report.trainable / max(report.total, 1),
        report.table(),
    )
    return report
