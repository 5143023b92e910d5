"""Preflight pieces: the flag, the exact-bits fingerprint, synthetic batches of the config's shapes.
The whole path (build, DeepSpeed engine, one step, report) runs for every preset in
tests/launchers/test_preset_steps.py."""

import pytest
import torch

from engine.config import RunConfig, load_config
from engine.trainer.preflight import fingerprint, pretrain_batch


@pytest.mark.parametrize(
    "dtype, bits",
    [
        (torch.float32, torch.int32),
        (torch.bfloat16, torch.int16),
        (torch.float16, torch.int16),
        (torch.int64, torch.int64),
    ],
)
def test_fingerprint_sees_a_one_ulp_change(dtype, bits):
    t = torch.randn(1000).to(dtype) if dtype.is_floating_point else torch.arange(1000)
    before = fingerprint(t)
    assert fingerprint(t.clone()) == before
    u = t.clone()
    u.view(bits)[123] += 1  # the next representable value
    assert not torch.equal(u, t) and fingerprint(u) != before


def test_pretrain_batches_have_the_real_shapes():
    cfg = load_config(RunConfig, None, ["--model.name", "vit_large_patch14_dinov2"])
    b = pretrain_batch(cfg, "dino", 14, 1, samples=1, device=torch.device("cpu"))
    assert b["global_crops"].shape == (2, 3, 224, 224) and b["local_crops"].shape == (8, 3, 98, 98)
    assert b["masks"].shape == (2, 256) and b["masks"].any()  # the iBOT path always runs
    mae = load_config(
        RunConfig,
        None,
        [
            "--model.name",
            "vit_large_patch16_224",
            "--objective.name",
            "mae",
            "--model.in_chans",
            "10",
            "--crops.global_size",
            "96",
        ],
    )
    assert pretrain_batch(mae, "mae", 16, 3, samples=2, device=torch.device("cpu"))["images"].shape == (2, 10, 96, 96)


def test_preflight_checks_sizes_before_building(capsys):
    from launchers.pretrain import main

    with pytest.raises(SystemExit) as e:
        main(["--preflight", "--model.name", "vit_base_patch14_dinov2", "--crops.local_size", "100"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --crops.local_size 100: not a multiple of patch size 14 (vit_base_patch14_dinov2); use 98"
    )
