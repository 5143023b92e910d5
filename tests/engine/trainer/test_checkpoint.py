import json
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.errors import UserError
from engine.trainer.checkpoint import (
    CheckpointManager,
    complete_checkpoints,
    extra_state,
    load_extra_state,
    read_meta,
    resolve_resume,
    tag_for,
)
from engine.trainer.rng import rng_state, seed_all, set_rng_state


class FakeEngine:
    """Stands in for DeepSpeedEngine's save/load (files under save_dir/tag, like DeepSpeed)."""

    def __init__(self, value=0.0, fail_save=False):
        self.value, self.fail_save = value, fail_save

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # our `latest` is written only after the rename
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"value": self.value, **client_state}, d / "mp_rank_00_model_states.pt")
        if self.fail_save:
            raise OSError("disk full")

    def load_checkpoint(self, load_dir, tag, **kw):
        p = Path(load_dir) / tag
        self.value = torch.load(p / "mp_rank_00_model_states.pt")["value"]
        return str(p), {}


def _save(mgr, engine, step):
    return mgr.save(engine, step, {"rng": rng_state(), "data": {"pos": step}, "extra": {}}, {"config": {}})


def test_save_is_complete_and_resume_picks_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, rank=0, world_size=1, keep_last=2)
    for step in (3, 6, 9):
        _save(mgr, FakeEngine(float(step)), step)
    ckdir = tmp_path / "checkpoints"
    assert [s for s, _ in complete_checkpoints(ckdir)] == [6, 9]  # keep_last pruned step 3
    assert (ckdir / "latest").read_text() == tag_for(9)
    meta = read_meta(ckdir / tag_for(9))
    assert meta["step"] == 9 and meta["complete"] is True and meta["world_size"] == 1
    assert resolve_resume("auto", tmp_path) == ckdir / tag_for(9)
    assert resolve_resume(str(tmp_path), tmp_path) == ckdir / tag_for(9)  # a run dir
    assert resolve_resume(str(ckdir / tag_for(6)), tmp_path) == ckdir / tag_for(6)
    assert resolve_resume("none", tmp_path) is None
    # a fresh run into this directory would interleave its steps with these: refused before it starts
    from engine.config import RunConfig
    from engine.trainer.launch import check_output_dir

    cfg = RunConfig()
    cfg.train.output_dir, cfg.train.resume = str(tmp_path), "none"
    with pytest.raises(
        UserError, match=r"--train.resume none: --train.output_dir '.*' holds 2 checkpoint\(s\) .*step 9"
    ):
        check_output_dir(cfg)
    cfg.train.resume = "auto"
    check_output_dir(cfg)
    cfg.train.output_dir, cfg.train.resume = str(tmp_path / "new"), "none"
    check_output_dir(cfg)
    eng = FakeEngine()
    meta, state = mgr.load(eng, ckdir / tag_for(6))
    assert eng.value == 6.0 and meta["step"] == 6 and state["data"] == {"pos": 6}


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, rank=0, world_size=1)
    _save(mgr, FakeEngine(1.0), 1)
    with pytest.raises(OSError):
        _save(mgr, FakeEngine(2.0, fail_save=True), 2)
    ckdir = tmp_path / "checkpoints"
    assert (ckdir / ".tmp-step_00000002").is_dir()  # the partial write never got the final name
    assert resolve_resume("auto", tmp_path) == ckdir / tag_for(1)
    assert (ckdir / "latest").read_text() == tag_for(1)
    mgr.remove_temp()
    assert not (ckdir / ".tmp-step_00000002").exists()


def test_incomplete_or_foreign_dirs_are_never_picked(tmp_path):
    ckdir = tmp_path / "checkpoints"
    mgr = CheckpointManager(tmp_path, rank=0, world_size=1)
    _save(mgr, FakeEngine(), 4)
    (ckdir / tag_for(7)).mkdir()  # a crash before meta.json (e.g. a hand-copied dir)
    (ckdir / tag_for(8)).mkdir()
    (ckdir / tag_for(8) / "meta.json").write_text(json.dumps({"format": "geoexplora-ckpt/1", "step": 8}))
    (ckdir / tag_for(9)).mkdir()
    (ckdir / tag_for(9) / "meta.json").write_text("{not json")
    (ckdir / "latest").write_text(tag_for(9))  # a stale pointer does not matter
    assert resolve_resume("auto", tmp_path) == ckdir / tag_for(4)
    assert resolve_resume("auto", tmp_path / "fresh") is None
    with pytest.raises(UserError, match="--train.resume"):
        resolve_resume(str(ckdir / tag_for(7)), tmp_path)
    with pytest.raises(UserError, match="--train.resume"):
        mgr.load(FakeEngine(), ckdir / tag_for(8))


def test_world_size_change_skips_rank_state(tmp_path):
    _save(CheckpointManager(tmp_path, rank=0, world_size=1), FakeEngine(), 2)
    meta, state = CheckpointManager(tmp_path, rank=0, world_size=2).load(FakeEngine(), resolve_resume("auto", tmp_path))
    assert meta["step"] == 2 and state is None


class WithExtra(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Module()
        self.ema = torch.zeros(3)
        self.lin = nn.Linear(2, 2)

    def get_extra_state(self):
        return {"ema": self.ema.clone()}

    def set_extra_state(self, s):
        self.ema = s["ema"]


def test_extra_state_roundtrip_and_rng():
    m = WithExtra()
    m.ema += 5
    state = extra_state(m)
    assert list(state) == [""]  # only modules that define extra state
    other = WithExtra()
    load_extra_state(other, state)
    assert torch.equal(other.ema, m.ema)
    with pytest.raises(UserError):
        load_extra_state(other, {"missing.module": {}})
    seed_all(3)
    snap = rng_state()
    a = torch.rand(4)
    set_rng_state(snap)
    assert torch.equal(torch.rand(4), a)
