"""The tiny preset on 2 CPU ranks (``DS_ACCELERATOR=cpu deepspeed --num_gpus 2``), four launches:

Z2 (ZeRO-2): SIGTERM to rank 0 once step 1 is logged -> both ranks stop at the same step with a
    complete checkpoint (rank 1 only learns of it through the all-reduce), nothing exported; then
    ``--train.resume auto`` in the same run dir continues to step 6 and exports.
Z3 (ZeRO-3): 6 steps straight (checkpoints at 3 and 6, export), and a second run resumed from the
    step-3 checkpoint into another run dir, on to step 6.

Checked: both stages complete and the loss decreases; stop + resume == straight through at ZeRO-3
(weights, EMA teacher, data position); only trainable tensors are in the optimizer; the exported
adapter and merged weights reproduce the trained model's features at both stages (gathered
correctly under ZeRO-3, not saved empty). The recipe trains the cls token and the base's DINOv2
mask token: tensors on the ViT itself, used outside any submodule forward, which ZeRO-3 gathers on
access and the EMA teacher must release around its swap; both train and have an EMA at ZeRO-3.

Resume equality is checked within one ZeRO stage: ZeRO-2 and ZeRO-3 runs agree at step 1 and to
1e-5 at step 2, then drift apart (DINO + AdamW amplify the different reduction order; measured 3e-2
on the weights at step 6), so a cross-stage comparison could not be tight.
"""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from engine.trainer.checkpoint import complete_checkpoints, read_meta
from engine.trainer.metrics import read_metrics
from tests.distributed.conftest import LAUNCHER, REPO, TINY, launch_env, run_pretrain, start_pretrain

pytestmark = pytest.mark.distributed
STEPS = 6


def _rank_process(launcher: psutil.Process, rank: int, timeout: float = 300) -> psutil.Process:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in launcher.children(recursive=True):
            try:
                if f"--local_rank={rank}" in p.cmdline():
                    return p
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} process did not appear")


def _wait_for(path, text: str, proc, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before '{text}' appeared in {path}")
        time.sleep(0.1)
    raise AssertionError(f"'{text}' did not appear in {path}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_shards, tiny_weights):
    root = tmp_path_factory.mktemp("runs")
    common = ["--data.shards", str(tiny_shards), "--model.weights", str(tiny_weights), "--train.max_steps", str(STEPS)]
    log = root / "z2.log"
    proc = start_pretrain(*common, "--zero.stage", "2", "--train.output_dir", str(root / "z2"), log=log)
    try:
        rank0 = _rank_process(psutil.Process(proc.pid), 0)
        _wait_for(root / "z2" / "metrics.jsonl", '"step": 1,', proc)
        rank0.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 143, log.read_text()[-3000:]  # 128 + SIGTERM: stopped after a checkpoint (launch.py passes it on)
    stopped = complete_checkpoints(root / "z2" / "checkpoints")
    exported_early = (root / "z2" / "export").exists()
    run_pretrain(*common, "--zero.stage", "2", "--train.output_dir", str(root / "z2"), "--train.resume", "auto")

    run_pretrain(*common, "--zero.stage", "3", "--train.output_dir", str(root / "z3"), "--train.save_every", "3")
    run_pretrain(
        *common,
        "--zero.stage",
        "3",
        "--train.output_dir",
        str(root / "z3r"),
        "--train.resume",
        str(_step(root, "z3", 3)),
        "--train.export",
        "false",
    )
    return root, stopped, exported_early


def _consolidated(ckpt):
    """fp32 state dict of the objective via DeepSpeed's offline tool (independent of our exporter)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def _step(root, run, step=STEPS):
    return root / run / "checkpoints" / f"step_{step:08d}"


def test_zero2_and_zero3_complete_and_loss_decreases(runs):
    root = runs[0]
    for run in ("z2", "z3"):  # z2: steps before SIGTERM + the resumed rest
        loss = [r["loss"] for r in read_metrics(root / run / "metrics.jsonl")]
        assert len(loss) == STEPS and all(map(torch.isfinite, torch.tensor(loss)))
        assert sum(loss[-2:]) < sum(loss[:2]), (run, loss)
        assert read_meta(_step(root, run))["step"] == STEPS


def test_sigterm_on_one_rank_leaves_complete_resumable_checkpoint(runs):
    root, stopped, exported_early = runs
    assert len(stopped) == 1 and not exported_early
    k = stopped[0][0]
    assert 1 <= k < STEPS  # the step in flight when the flag was seen is abandoned, not half-saved
    events = [
        json.loads(line) for line in (root / "z2" / "metrics.jsonl").read_text().splitlines() if '"event"' in line
    ]
    assert [(e["event"], e["step"]) for e in events] == [("preempted", k), ("resume", k)]
    assert events[0]["signal"] == "SIGTERM"
    ckpt = _step(root, "z2", k)
    meta = read_meta(ckpt)
    assert meta["world_size"] == 2 and meta["zero_stage"] == 2 and meta["git"]
    for f in (
        "rank_00000.pt",
        "rank_00001.pt",
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ):
        assert (ckpt / f).is_file(), f
    ckdir = root / "z2" / "checkpoints"
    assert (ckdir / "latest").read_text() == _step(root, "z2").name
    assert not [p for p in ckdir.iterdir() if p.name.startswith(".tmp-")]


def test_stop_and_resume_equals_straight_run(runs):
    root = runs[0]
    a, b = _step(root, "z3"), _step(root, "z3r")
    sa, sb = _consolidated(a), _consolidated(b)
    assert sa.keys() == sb.keys() and any(k.endswith("lora_b") for k in sa)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=k)
    for r in (0, 1):  # per rank: data position and this rank's EMA-teacher shards
        ra = torch.load(a / f"rank_{r:05d}.pt", weights_only=False)
        rb = torch.load(b / f"rank_{r:05d}.pt", weights_only=False)
        da, db = ra["data"], rb["data"]
        assert (da["epoch"], da["batches"], da["samples"]) == (db["epoch"], db["batches"], db["samples"])
        ema_a, ema_b = ra["extra"][""]["teacher"]["ema"], rb["extra"][""]["teacher"]["ema"]
        assert ema_a.keys() == ema_b.keys() and {"vit.cls_token", "vit.mask_token"} <= set(ema_a)
        for k in ema_a:
            torch.testing.assert_close(ema_b[k], ema_a[k], rtol=1e-5, atol=1e-6, msg=k)
    events = [
        json.loads(line) for line in (root / "z3r" / "metrics.jsonl").read_text().splitlines() if '"event"' in line
    ]
    assert [(e["event"], e["step"]) for e in events] == [("resume", 3)]


def test_only_trainable_tensors_in_optimizer(runs):
    root = runs[0]
    for run, key in (("z2", "single_partition_of_fp32_groups"), ("z3", "fp32_flat_groups")):
        report = json.loads((root / run / "optimizer.json").read_text())
        assert report["frozen_numel"] > 0 and report["trainable_numel"] > 0
        names = [n for g in report["groups"] for n in g["names"]]
        assert not any(n.startswith("vit.blocks.0.") and n.endswith(("qkv.weight", "fc1.weight")) for n in names)
        assert {"vit.cls_token", "vit.mask_token"} <= set(names)
        flat = 0
        for r in (0, 1):
            osd = torch.load(_step(root, run) / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
            flat += sum(g.numel() for g in osd["optimizer_state_dict"][key])
        # fp32 master partitions hold the trainable elements (+ alignment padding), not the frozen base
        assert report["trainable_numel"] <= flat < report["trainable_numel"] + report["frozen_numel"] // 2, run


def test_zero3_checkpoint_as_weights_is_refused_with_a_hint(runs):
    """README: ZeRO-3 checkpoints are refused as --model.weights, pointing to export/ or zero_to_fp32.py."""
    from engine.config import RunConfig, load_config
    from engine.errors import UserError
    from engine.model.vit import build_vit

    cfg = load_config(RunConfig, str(TINY), ["--model.weights", str(_step(runs[0], "z3"))])
    with pytest.raises(UserError, match="ZeRO-3 checkpoint.*zero_to_fp32.py"):
        build_vit(cfg.model)


def test_zero_checkpoint_on_another_world_size_is_one_line_and_its_weights_go_on(runs, tiny_shards, tmp_path):
    """2-rank ZeRO-2 checkpoint, 1-rank run: DeepSpeed cannot re-split the optimizer state, so the
    resume stops with one line before loading; the suggested way on (its weights) runs."""
    ckpt = _step(runs[0], "z2")
    one_rank = [sys.executable, str(LAUNCHER), "--config", str(TINY), "--data.shards", str(tiny_shards)]
    one_rank += ["--data.num_workers", "0", "--train.logger", "", "--zero.stage", "2", "--train.max_steps", "1"]

    def launch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*one_rank, *args], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300
        )

    p = launch("--train.output_dir", str(tmp_path / "r"), "--train.resume", str(ckpt))
    errors = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "was written by 2 rank(s) with ZeRO-2, this run has 1" in errors[0] and "--model.weights" in errors[0]
    p = launch("--train.output_dir", str(tmp_path / "w"), "--model.weights", str(ckpt))
    assert p.returncode == 0, p.stderr[-3000:]


def _features(vit, x):
    from engine.model.tokens import pooled_features

    vit.eval()
    with torch.no_grad():
        return pooled_features(vit, x, avgpool=False)


@pytest.mark.parametrize("run", ["z2", "z3"])
def test_exported_adapter_reproduces_trained_features(runs, tiny_weights, run):
    from safetensors.torch import load_file

    from engine.config import RunConfig, load_config
    from engine.model.explora import apply_explora
    from engine.model.vit import build_from_adapter, build_vit

    root = runs[0]
    cfg = load_config(RunConfig, str(TINY), ["--model.weights", str(tiny_weights)])
    trained = build_vit(cfg.model)
    apply_explora(trained, cfg.explora)
    state = _consolidated(_step(root, run))
    trained.load_state_dict({k[len("vit.") :]: v for k, v in state.items() if k.startswith("vit.")}, strict=True)
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    ref = _features(trained, x)

    export = root / run / "export"
    from_adapter = build_from_adapter(export / "adapter.safetensors", weights=str(tiny_weights))
    torch.testing.assert_close(_features(from_adapter, x), ref, rtol=1e-5, atol=1e-5)
    merged = build_vit(load_config(RunConfig, str(TINY)).model)
    merged.load_state_dict(load_file(str(export / "vit_merged.safetensors")), strict=True)
    torch.testing.assert_close(_features(merged, x), ref, rtol=1e-4, atol=1e-4)
    teacher = build_from_adapter(export / "teacher_adapter.safetensors", weights=str(tiny_weights))
    assert not torch.allclose(_features(teacher, x), ref)  # the EMA teacher lags the student


def test_root_tensors_train_under_zero3(runs, tiny_weights):
    """cls token and mask token moved away from the base at ZeRO-3, and the EMA teacher's copies
    differ from the student's (the swap reached them: no stale gathered copy was used)."""
    from safetensors.torch import load_file

    root = runs[0]
    base = load_file(str(tiny_weights))
    state = _consolidated(_step(root, "z3"))
    for name in ("cls_token", "mask_token"):
        assert not torch.allclose(state[f"vit.{name}"].reshape(base[name].shape), base[name]), name
    ema = {}
    for r in (0, 1):
        shard = torch.load(_step(root, "z3") / f"rank_{r:05d}.pt", weights_only=False)["extra"][""]["teacher"]["ema"]
        ema[r] = shard["vit.cls_token"].flatten()
    teacher_cls = torch.cat([ema[0], ema[1]])[: state["vit.cls_token"].numel()]
    assert not torch.allclose(teacher_cls, state["vit.cls_token"].flatten())
