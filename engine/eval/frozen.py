"""Frozen-feature evaluation of a backbone: linear probe (lr sweep picked on val) and weighted kNN,
on cls features and/or cls + mean-patch features, multi-class (top-1/top-5) or multi-label (mAP).

``evaluate_frozen(cfg, env)`` extracts features of every split once (cached in
``<eval.output_dir>/features/<split>.pt``, keyed by model and data), runs the probes, writes
``results.json`` + ``results.txt`` and returns the results dict. Every rank extracts its share of
the features; the probes run on rank 0's gathered copy and only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from engine.atomic import atomic_write_text
from engine.config import save_config, to_dict
from engine.errors import UserError
from engine.eval.config import EvalRunConfig
from engine.eval.features import extract_features, fingerprint, load_features, save_features
from engine.eval.knn import knn_eval
from engine.eval.linear_probe import linear_probe

log = logging.getLogger(__name__)


def _pools(cfg: EvalRunConfig) -> list[str]:
    return ["cls", "cls_avgpool"] if cfg.eval.pool == "both" else [cfg.eval.pool]


def _split_features(cfg: EvalRunConfig, vit, env, split: str, pools: list[str]):
    """(feats {pool: (N, D)}, labels, classes, multilabel) of one split, from the cache when valid."""
    from engine.data import build_eval_loader
    from engine.model.base_identity import base_info

    loader = build_eval_loader(
        cfg.data,
        cfg.model.img_size,
        split=split,
        rank=env.rank,
        world_size=env.world_size,
        multilabel=cfg.eval.multilabel,
    )
    info = base_info(vit)
    key = fingerprint(
        info.name,
        info.weights,
        info.weights_sha256(),
        cfg.model.adapter,
        to_dict(cfg.model),
        str(Path(cfg.data.shards) / split),
        loader.manifest,
        cfg.data.bands,
        cfg.data.eval_crop_pct,
        cfg.data.mean,
        cfg.data.std,
        cfg.data.clip_percentiles,
    )
    path = Path(cfg.eval.output_dir) / "features" / f"{split}.pt"
    cached = load_features(path, key, pools) if cfg.eval.reuse_features else None
    found = [cached is not None]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(found, src=0)  # every rank takes the same branch
    if found[0] and cached is not None:
        log.info("%s: %d cached features from %s", split, len(cached[1]), path)
        feats, labels = cached
    elif found[0]:  # rank 0 has the cache, this rank does not see it (no shared filesystem)
        raise UserError(
            f"--eval.output_dir '{cfg.eval.output_dir}': not on a filesystem every rank shares; "
            "use a shared directory or --eval.reuse_features false"
        )
    else:
        feats, labels = extract_features(vit, loader, env.device, pools, cfg.eval.precision, desc=f"features {split}")
        if env.is_main:
            save_features(path, feats, labels, key)
    return feats, labels, loader.class_names, bool(loader.multilabel)


def format_table(results: dict) -> str:
    """Rows: method x pool; columns: val/test scores (top-1, top-5 or mAP) and the chosen lr."""
    metric_names = ["mAP"] if results["multilabel"] else ["top1", "top5"]
    splits = ["val"] + (["test"] if results.get("has_test") else [])
    cols = [f"{s} {m}" for s in splits for m in metric_names]
    head = f"{'method':<14} {'features':<12} " + " ".join(f"{c:>10}" for c in cols) + f" {'probe lr':>9}"
    lines = [head, "-" * len(head)]
    for pool, res in results["pools"].items():
        for method in ("linear_probe", "knn"):
            r = res[method]
            vals = [r.get(s, {}).get(m) if r.get(s) else None for s in splits for m in metric_names]
            cells = " ".join(f"{v:>10.2f}" if v is not None else f"{'-':>10}" for v in vals)
            lr = f"{r['best_lr']:>9.3g}" if "best_lr" in r else f"{'':>9}"
            lines.append(f"{method:<14} {pool:<12} {cells} {lr}")
    return "\n".join(lines)


def evaluate_frozen(cfg: EvalRunConfig, env) -> dict:
    """Linear probe + kNN of the backbone ``cfg.model`` on the splits ``cfg.eval.splits``."""
    from engine.model.vit import build_vit

    for split in cfg.eval.splits:
        if not (Path(cfg.data.shards) / split).is_dir():
            raise UserError(f"--data.shards '{cfg.data.shards}': no '{split}' sub-directory (see --eval.splits)")
    t0 = time.perf_counter()
    out = Path(cfg.eval.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    pools = _pools(cfg)
    vit = build_vit(cfg.model, env.device)
    data = {s: _split_features(cfg, vit, env, s, pools) for s in cfg.eval.splits}
    train_s, val_s = cfg.eval.splits[0], cfg.eval.splits[1]
    test_s = cfg.eval.splits[2] if len(cfg.eval.splits) == 3 else None
    classes, multilabel = data[train_s][2], data[train_s][3]
    t_feat = time.perf_counter() - t0
    results = {
        "model": to_dict(cfg.model),
        "shards": cfg.data.shards,
        "classes": classes,
        "multilabel": multilabel,
        "num_samples": {s: int(len(d[1])) for s, d in data.items()},
        "has_test": test_s is not None,
        "pools": {},
    }
    for pool in pools:
        tr, va = data[train_s], data[val_s]
        te = data[test_s] if test_s else None
        probe = linear_probe(
            tr[0][pool],
            tr[1],
            va[0][pool],
            va[1],
            len(classes),
            te[0][pool] if te else None,
            te[1] if te else None,
            lrs=tuple(cfg.eval.probe_lrs),
            epochs=cfg.eval.probe_epochs,
            batch_size=cfg.eval.probe_batch_size,
            weight_decay=cfg.eval.probe_weight_decay,
            multilabel=multilabel,
            seed=cfg.eval.seed,
        )
        knn = {
            "val": knn_eval(
                tr[0][pool], tr[1], va[0][pool], va[1], len(classes), cfg.eval.knn_k, cfg.eval.knn_temperature
            ),
            "k": cfg.eval.knn_k,
            "temperature": cfg.eval.knn_temperature,
        }
        if te:
            knn["test"] = knn_eval(
                tr[0][pool], tr[1], te[0][pool], te[1], len(classes), cfg.eval.knn_k, cfg.eval.knn_temperature
            )
        results["pools"][pool] = {
            "linear_probe": {
                "val": probe.val,
                "test": probe.test,
                "best_lr": probe.best_lr,
                "sweep": {str(k): v for k, v in probe.sweep.items()},
            },
            "knn": knn,
        }
    results["feature_s"] = round(t_feat, 2)
    results["wall_s"] = round(time.perf_counter() - t0, 2)
    table = format_table(results)
    if env.is_main:
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))
        atomic_write_text(out / "results.txt", table + "\n")
        log.info("frozen-feature evaluation of %s (%s):\n%s", cfg.model.name, cfg.model.weights or "random init", table)
    return results
