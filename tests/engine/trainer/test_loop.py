"""The Trainer on a real single-rank DeepSpeed engine (gloo, CPU) with a toy objective: what goes
into the optimizer, the lr schedule, NaN/inf skipping and halting, and resume equality."""

import math
import os
import signal

import pytest
import torch
from torch import nn

from engine.config import RunConfig, load_config
from engine.objectives.objective import Objective
from engine.trainer.checkpoint import resolve_resume
from engine.trainer.loop import NonFiniteLoss, Trainer
from engine.trainer.metrics import read_metrics
from engine.trainer.schedules import OptimSchedule


@pytest.fixture(scope="module")
def env(single_rank_env):
    return single_rank_env


class ToyObjective(Objective):
    """y = head(norm(base(x))) with a frozen base; NaN loss on the micro-batches listed in ``nan_at``."""

    def __init__(self, nan_at=()):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(8, 16)
        self.base.requires_grad_(False)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 1)
        self.nan_at, self.calls, self.ends = set(nan_at), 0, []

    def on_step_end(self, step):
        self.ends.append(step)

    def forward(self, batch, step):
        self.calls += 1
        loss = ((self.head(self.norm(self.base(batch["x"]))).squeeze(-1) - batch["y"]) ** 2).mean()
        if self.calls in self.nan_at:
            loss = loss * float("inf")
        return loss, {"mse": loss.item()}


class Stream:
    """Deterministic batches; the position is the number of batches handed out."""

    def __init__(self):
        self.pos = 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.pos)
            x = torch.randn(4, 8, generator=g)
            self.pos += 1
            yield {"x": x, "y": x.sum(-1)}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def _cfg(tmp_path, *extra):
    return load_config(
        RunConfig,
        None,
        [
            "--train.precision",
            "fp32",
            "--data.batch_size",
            "4",
            "--optim.lr",
            "0.05",
            "--optim.warmup_steps",
            "2",
            "--train.log_every",
            "1",
            "--train.logger",
            "",
            "--train.output_dir",
            str(tmp_path),
            *extra,
        ],
    )


def test_optimizer_holds_only_trainable_and_schedule_is_applied(env, tmp_path):
    cfg = _cfg(tmp_path, "--train.max_steps", "4", "--zero.stage", "1")
    obj = ToyObjective()
    trainer = Trainer(cfg, obj, Stream(), env)
    result = trainer.fit()
    assert result.step == 4 and obj.ends == [0, 1, 2, 3]
    trainable = {id(p) for p in obj.parameters() if p.requires_grad}
    assert trainer.report.trainable_numel == sum(p.numel() for p in obj.parameters() if p.requires_grad)
    assert trainer.report.frozen_numel == sum(p.numel() for p in obj.base.parameters())
    # ZeRO-1 keeps flat fp32 copies of exactly the trainable elements; the frozen base has none
    flat = sum(p.numel() for g in trainer.engine.optimizer.param_groups for p in g["params"])
    assert sum(p.numel() for p in obj.parameters() if id(p) in trainable) <= flat < obj.base.weight.numel()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    sched = OptimSchedule.from_config(cfg.optim, 4, 4)
    assert [r["lr"] for r in rows] == pytest.approx([sched.lr(s) for s in range(4)])
    assert all(math.isfinite(r["grad_norm"]) for r in rows)
    assert (tmp_path / "checkpoints" / "step_00000004" / "meta.json").is_file()


def test_nonfinite_micro_batch_is_skipped_then_halts(env, tmp_path):
    obj = ToyObjective(nan_at={2})
    result = Trainer(_cfg(tmp_path / "a", "--train.max_steps", "3"), obj, Stream(), env).fit()
    assert result.step == 3 and obj.calls == 4  # the bad micro-batch was replaced by the next one
    assert all(torch.isfinite(p).all() for p in obj.parameters())
    events = [line for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if "skip_nonfinite" in line]
    assert len(events) == 1
    obj = ToyObjective(nan_at={2, 3, 4})
    with pytest.raises(NonFiniteLoss, match="3 consecutive"):
        Trainer(_cfg(tmp_path / "b", "--train.max_steps", "5", "--train.max_bad_steps", "3"), obj, Stream(), env).fit()


def test_resume_continues_exactly(env, tmp_path):
    full = ToyObjective()
    Trainer(
        _cfg(
            tmp_path / "full",
            "--train.max_steps",
            "6",
            "--train.save_every",
            "3",
            "--train.grad_accum_steps",
            "2",
            "--zero.stage",
            "2",
        ),
        full,
        Stream(),
        env,
    ).fit()
    first = resolve_resume(str(tmp_path / "full"), tmp_path)
    assert first.name == "step_00000006"
    part = ToyObjective()
    stream = Stream()
    ckpt3 = tmp_path / "full" / "checkpoints" / "step_00000003"
    Trainer(
        _cfg(
            tmp_path / "part",
            "--train.max_steps",
            "6",
            "--train.resume",
            str(ckpt3),
            "--train.grad_accum_steps",
            "2",
            "--zero.stage",
            "2",
        ),
        part,
        stream,
        env,
    ).fit()
    assert stream.pos == 12  # 3 steps x 2 micro-batches restored + 3 x 2 more
    for a, b in zip(full.parameters(), part.parameters()):
        torch.testing.assert_close(a, b)
    assert part.ends == [3, 4, 5]


class SignalledStream(Stream):
    """Sends this process SIGTERM while handing out batch ``at``; the fetch after it fails the way
    a DataLoader whose workers died of the same signal does."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def __iter__(self):
        for batch in super().__iter__():
            if self.pos == self.at + 1:
                os.kill(os.getpid(), signal.SIGTERM)
            elif self.pos > self.at + 1:
                raise RuntimeError("DataLoader worker (pid 1) exited unexpectedly")
            yield batch


def test_preemption_mid_accumulation_resumes_exactly(env, tmp_path):
    args = ["--train.max_steps", "4", "--train.grad_accum_steps", "2", "--zero.stage", "2"]
    full = ToyObjective()
    Trainer(_cfg(tmp_path / "full", *args), full, Stream(), env).fit()

    # batch 3 is the 2nd micro-batch of step 1: step 1 is abandoned, the checkpoint holds step 1's start
    part = ToyObjective()
    result = Trainer(_cfg(tmp_path / "part", *args), part, SignalledStream(at=3), env).fit()
    assert result.preempted == "SIGTERM" and result.step == 1
    assert resolve_resume("auto", tmp_path / "part").name == "step_00000001"
    assert part.ends == [0]
    rest = ToyObjective()
    stream = Stream()
    Trainer(_cfg(tmp_path / "part", *args), rest, stream, env).fit()
    assert rest.ends == [1, 2, 3] and stream.pos == 8
    for a, b in zip(full.parameters(), rest.parameters()):
        torch.testing.assert_close(a, b)
