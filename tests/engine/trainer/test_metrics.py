import json

import pytest
import torch

from engine.config import RunConfig, load_config
from engine.trainer.flops import device_peak_flops, training_flops_per_sample, vit_forward_flops
from engine.trainer.metrics import MetricsWriter, ThroughputMeter, read_metrics


def test_jsonl_records_events_and_last_record_wins(tmp_path):
    w = MetricsWriter(tmp_path, enabled=True, loggers=())
    w.write(1, {"loss": 3.0, "lr": 0.1})
    w.write(2, {"loss": 2.5})
    w.event("resume", 1, checkpoint="x")
    w.write(2, {"loss": 2.0})  # step 2 redone after a resume
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("event") for x in lines] == [None, None, "resume", None]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == 2.0
    MetricsWriter(tmp_path / "off", enabled=False).write(1, {"loss": 1.0})
    assert not (tmp_path / "off").exists()


def test_throughput_split_and_mfu():
    m = ThroughputMeter(
        images_per_step=64, world_size=4, device=torch.device("cpu"), flops_per_image=1e9, peak_flops=1e12
    )
    m.t0 -= 2.0  # pretend the interval took 2 s
    m.add_data_wait(0.5)
    m.step_done()
    m.step_done()
    s = m.snapshot()
    assert s["images_per_s"] == pytest.approx(64, rel=0.05)
    assert s["images_per_s_per_device"] == pytest.approx(16, rel=0.05)
    assert s["data_wait_frac"] == pytest.approx(0.25, rel=0.05)
    assert s["step_time_s"] == pytest.approx(1.0, rel=0.05)
    assert s["mfu"] == pytest.approx(16 * 1e9 / 1e12, rel=0.05)
    assert s["peak_mem_gb"] > 0


def test_vit_flops_match_published_counts():
    from engine.model.vit import build_vit

    cfg = load_config(RunConfig, None, ["--model.name", "vit_base_patch16_224", "--objective.name", "mae"])
    vit = build_vit(cfg.model, device="meta")
    # ViT-B/16 at 224 px: 17.6 G multiply-adds (fvcore's "GFLOPs" count multiply-adds)
    assert vit_forward_flops(vit, 224) / 2 == pytest.approx(17.6e9, rel=0.03)
    mae = load_config(RunConfig, None, ["--model.name", "vit_base_patch16_224", "--objective.name", "mae"])
    per = training_flops_per_sample(mae, vit)
    enc = vit_forward_flops(vit, 224, keep_ratio=0.25)
    assert 3 * enc < per < 3 * vit_forward_flops(vit, 224)
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert device_peak_flops("NVIDIA A100-SXM4-40GB", "fp32") == 156e12
    assert device_peak_flops("cpu", "bf16") == 0 and device_peak_flops("cpu", "bf16", 2.0) == 2e12
