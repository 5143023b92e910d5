"""Streaming data: shard spec -> per-rank loader of source-dtype batches -> device-side photometric
augmentation and normalisation. Public entry points are re-exported here."""

from engine.data.builders import build_eval_loader, build_finetune_loader, build_normalizer, build_pretrain_loader
from engine.data.labels import ClassIndex, MultiLabelIndex
from engine.data.loader import ShardLoader
from engine.data.normalize import Normalizer, to_device
from engine.data.photometric import Photometric
from engine.data.shardspec import ShardSet, resolve_shards
from engine.data.skips import SkipRateExceeded

__all__ = [
    "build_pretrain_loader",
    "build_finetune_loader",
    "build_eval_loader",
    "build_normalizer",
    "ClassIndex",
    "MultiLabelIndex",
    "ShardLoader",
    "Normalizer",
    "Photometric",
    "to_device",
    "ShardSet",
    "resolve_shards",
    "SkipRateExceeded",
]
