"""Training-time faults (issue 15): each case reproduces a fault and checks what the README promises.

Runs that must be signalled, killed or given a broken file system are real command lines in their
own session (bounded by ``TIMEOUT_S``); a process is made to die at a fixed point of a checkpoint by
a driver that patches the trainer in that process, so nothing waits on timing. Read-only and full
file systems are real ones (a private mount namespace: a read-only bind mount, a size-limited
tmpfs), so the errno comes from the kernel through every layer -- torch.save's C++ writer included.
Bad config values and the skip-rate abort run in this process (no subprocess to wait on; bounded
by ``deadline``).
"""

import json
import os
import signal
import textwrap

import numpy as np
import pytest
import torch

from engine.trainer.checkpoint import complete_checkpoints, read_meta, tag_for
from tests.faults.conftest import (
    REPO,
    TIMEOUT_S,
    TINY,
    TINY_ARGS,
    in_namespace,
    kill_group,
    metrics_reached,
    run_cli,
    start_cli,
    wait_for,
)

PRETRAIN = str(REPO / "launchers" / "pretrain.py")


def _events(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"event"' in line]


@pytest.fixture
def launcher_env():
    """In-process launcher runs join a one-rank process group, which sets RANK, MASTER_PORT, ...;
    put the environment back afterwards."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.pop(k, None) for k in keys}
    yield
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


# ---------------------------------------------------------------------------- signals, kill -9, NaN
KILL_IN_COMMIT = textwrap.dedent("""
    # pretrain, SIGKILLed inside its next checkpoint: every rank file written, meta.json and the rename not yet
    import os, signal, sys
    from engine.trainer import checkpoint
    checkpoint.CheckpointManager._commit = lambda self, *a: os.kill(os.getpid(), signal.SIGKILL)
    sys.argv[0] = {launcher!r}
    from launchers.pretrain import main
    sys.exit(main())
""")


def test_ctrl_c_then_kill9_mid_checkpoint_then_nan_halt(tiny_shards, tmp_path):
    """One run's life: Ctrl-C (checkpoint, 130); resumed and SIGKILLed inside a checkpoint (the half
    checkpoint is never used); resumed from the last complete one with an lr that blows up: the
    NaN halt exits 1 with one error line naming the step and the last checkpoint, nothing exported."""
    run_dir = tmp_path / "run"
    common = [
        *TINY_ARGS,
        "--data.shards",
        str(tiny_shards),
        "--train.output_dir",
        str(run_dir),
        "--train.save_every",
        "1",
        "--train.max_steps",
        "1000",
    ]

    log = tmp_path / "ctrl_c.log"
    proc = start_cli([PRETRAIN, *common], log)
    try:
        wait_for("step 2", metrics_reached(run_dir, 2), proc, log=log)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        rc = proc.wait(timeout=TIMEOUT_S)
    finally:
        kill_group(proc)
    assert rc == 130, log.read_text()[-3000:]
    k = complete_checkpoints(run_dir / "checkpoints")[-1][0]
    stop = _events(run_dir)[-1]
    assert k >= 2 and (stop["event"], stop["step"], stop["signal"]) == ("preempted", k, "SIGINT")

    driver = tmp_path / "kill_in_commit.py"
    driver.write_text(KILL_IN_COMMIT.format(launcher=PRETRAIN))
    killed = run_cli([str(driver), *common])
    assert killed.rc == -signal.SIGKILL, killed.tail()
    half = run_dir / "checkpoints" / f".tmp-{tag_for(k + 1)}"
    assert (half / "rank_00000.pt").is_file() and not (half / "meta.json").exists()
    assert complete_checkpoints(run_dir / "checkpoints")[-1][0] == k
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(k)

    nan = run_cli(
        [
            PRETRAIN,
            *common,
            "--optim.lr",
            "1e30",
            "--optim.warmup_steps",
            "0",
            "--optim.clip_grad",
            "0",
            "--train.max_bad_steps",
            "2",
        ]
    )
    assert nan.rc == 1, nan.tail()
    assert [e for e in _events(run_dir) if e["event"] == "resume"][-1]["step"] == k  # not the half checkpoint
    assert not half.exists()  # leftovers of the killed save are removed at the next start
    assert len(nan.errors) == 1 and "Traceback" not in nan.stderr, nan.tail()
    err = nan.errors[0]
    last = complete_checkpoints(run_dir / "checkpoints")[-1][1]
    assert "2 consecutive micro-batches at step" in err and f"(last checkpoint: {last})" in err, err
    assert read_meta(last)["step"] > k  # the lr blew the weights up one step before the loss went NaN
    assert not (run_dir / "export").exists()
    assert [e["event"] for e in _events(run_dir)][-2:] == ["skip_nonfinite", "skip_nonfinite"]


# ---------------------------------------------------------------------------- corrupt data during training
def test_truncated_shard_is_skipped_counted_and_training_goes_on(shards_copy, tmp_path, capsys, launcher_env, deadline):
    from launchers.pretrain import main

    deadline(TIMEOUT_S)
    for shard in shards_copy.glob("*.tar"):  # every shard, so the stream meets one whatever its order
        shard.write_bytes(shard.read_bytes()[: int(shard.stat().st_size * 0.9)])  # cut inside the last sample
    run_dir = tmp_path / "run"
    rc = main(
        [
            *TINY_ARGS,
            "--data.shards",
            str(shards_copy),
            "--train.output_dir",
            str(run_dir),
            "--train.max_steps",
            "3",
            "--data.batch_size",
            "4",
            "--train.export",
            "false",
            "--data.max_skip_rate",
            "0.5",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "skipping the rest of shard" in err and "sample(s) lost" in err
    totals = torch.load(run_dir / "checkpoints" / tag_for(3) / "rank_00000.pt", weights_only=False)["data"]["totals"]
    assert totals["bad_shards"] >= 1 and totals["skipped"] >= 1 and totals["seen"] >= 3 * 4


def test_skip_rate_abort_is_one_error_line(shards_copy, tmp_path, capsys, launcher_env, deadline):
    from launchers.pretrain import main

    deadline(TIMEOUT_S)
    for shard in shards_copy.glob("*.tar"):
        shard.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(SystemExit) as e:
        main(
            [
                *TINY_ARGS,
                "--data.shards",
                str(shards_copy),
                "--train.output_dir",
                str(tmp_path / "run"),
                "--data.max_skip_rate",
                "0.5",
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert errors[0].startswith("error: --data.max_skip_rate:") and "re-convert" in errors[0]
    assert not complete_checkpoints(tmp_path / "run" / "checkpoints")


# ---------------------------------------------------------------------------- bad config values
@pytest.fixture(scope="module")
def bad_presets(tmp_path_factory):
    d = tmp_path_factory.mktemp("presets")
    files = {
        "unclosed.yaml": "train: [max_steps\n",
        "list.yaml": "- train\n- data\n",
        "unknown_key.yaml": "train:\n  max_stepz: 3\n",
        "wrong_type.yaml": "optim:\n  lr: fast\n",
        "section_scalar.yaml": "train: 5\n",
    }
    for name, text in files.items():
        (d / name).write_text(text)
    (d / "a_file").write_text("x")
    return d


# (launcher, extra args, the flag the one error line must name); {p}: bad presets, {s}: tiny shards
BAD_VALUES = [
    ("pretrain", ["--train.max_stepz", "3"], "--train.max_stepz"),  # unknown option
    ("pretrain", ["--trian.max_steps", "3"], "--trian"),  # unknown section
    ("pretrain", ["--train.max_steps", "ten"], "--train.max_steps"),  # wrong type
    ("pretrain", ["--optim.lr", "fast"], "--optim.lr"),
    ("pretrain", ["--train.export", "maybe"], "--train.export"),
    ("pretrain", ["--explora.unfreeze_blocks", "last"], "--explora.unfreeze_blocks"),
    ("pretrain", ["--train.precision", "fp8"], "--train.precision"),  # not one of the choices
    ("pretrain", ["--zero.stage", "5"], "--zero.stage"),  # out of range
    ("pretrain", ["--data.max_skip_rate", "1.5"], "--data.max_skip_rate"),
    ("pretrain", ["--train.keep_last", "0"], "--train.keep_last"),
    ("pretrain", ["--optim.lr", "-1"], "--optim.lr"),
    ("pretrain", ["--model.name", "vit_nope"], "--model.name"),
    ("pretrain", ["--model.weights", "/no/such/base.pth"], "--model.weights"),  # missing files
    ("pretrain", ["--model.adapter", "/no/such/adapter.safetensors"], "--model.adapter"),
    ("pretrain", ["--data.shards", "/no/such/shards"], "--data.shards"),
    ("pretrain", ["--train.resume", "/no/such/checkpoint"], "--train.resume"),
    ("pretrain", ["--config", "/no/such/preset.yaml"], "--config"),
    ("pretrain", ["--config", "{p}/unclosed.yaml"], "--config"),  # bad YAML presets
    ("pretrain", ["--config", "{p}/list.yaml"], "--config"),
    ("pretrain", ["--config", "{p}/unknown_key.yaml"], "--train.max_stepz"),
    ("pretrain", ["--config", "{p}/wrong_type.yaml"], "--optim.lr"),
    ("pretrain", ["--config", "{p}/section_scalar.yaml"], "--train"),
    ("pretrain", ["extra_positional"], "unexpected argument"),
    ("pretrain", ["--train.output_dir", "{p}/a_file/run"], "--train.output_dir"),  # below a regular file
    ("pretrain", ["--train.output_dir", "{p}/a_file"], "--train.output_dir"),  # is a regular file
    ("finetune", ["--finetune.mode", "half"], "--finetune.mode"),
    ("finetune", ["--finetune.layer_decay", "0"], "--finetune.layer_decay"),
    ("finetune", ["--train.output_dir", "{p}/a_file/run"], "--train.output_dir"),
    ("evaluate", ["--eval.splits", "train,nope"], "--data.shards"),
    ("evaluate", ["--eval.output_dir", "{p}/a_file/eval"], "--eval.output_dir"),
]


@pytest.fixture(scope="module")
def splits(tiny_shards, tmp_path_factory):
    """A shard root with train/ and val/ splits (both the tiny shards), as finetune/evaluate read."""
    root = tmp_path_factory.mktemp("splits")
    for split in ("train", "val"):
        (root / split).symlink_to(tiny_shards, target_is_directory=True)
    return root


@pytest.mark.parametrize(
    "launcher, extra, flag", BAD_VALUES, ids=[f"{launcher}:{' '.join(a)}" for launcher, a, _ in BAD_VALUES]
)
def test_bad_value_is_one_error_line_exit_2(
    launcher, extra, flag, tiny_shards, splits, bad_presets, tmp_path, capsys, launcher_env, deadline
):
    import torch.distributed as dist

    from launchers import evaluate, finetune, pretrain

    deadline(60)
    # small enough that a value wrongly accepted trains for a moment, without loader workers, and fails the test
    run = ["--data.num_workers", "0", "--data.batch_size", "4"] + (
        ["--train.max_steps", "1", "--train.export", "false"] if launcher != "evaluate" else []
    )
    base = {
        "pretrain": ["--config", str(TINY), "--data.shards", str(tiny_shards)],
        "finetune": [
            "--config",
            str(REPO / "engine" / "presets" / "finetune_tiny_cpu.yaml"),
            "--data.shards",
            str(splits),
        ],
        "evaluate": ["--model.name", "tiny", "--data.shards", str(splits)],
    }[launcher] + run
    out = "--eval.output_dir" if launcher == "evaluate" else "--train.output_dir"
    args = [a.format(p=bad_presets, s=tiny_shards) for a in extra]
    main = {"pretrain": pretrain, "finetune": finetune, "evaluate": evaluate}[launcher].main
    with pytest.raises(SystemExit) as e:
        main([*base, out, str(tmp_path / "run"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err
    assert not (dist.is_available() and dist.is_initialized())  # found before any process group


def test_bad_value_from_the_command_line_prints_only_the_error(tiny_shards, tmp_path):
    """The same through a real process: nothing but the one line on stderr (no usage, no traceback)."""
    res = run_cli(
        [
            PRETRAIN,
            *TINY_ARGS,
            "--data.shards",
            str(tiny_shards),
            "--train.output_dir",
            str(tmp_path),
            "--zero.stage",
            "5",
        ],
        timeout=120,
    )
    assert res.rc == 2 and res.stderr.strip().splitlines() == res.errors and len(res.errors) == 1, res.tail()
    assert res.errors[0] == "error: --zero.stage: must be 0, 1, 2 or 3"


# ---------------------------------------------------------------------------- run directory on a broken file system
def test_output_dir_on_read_only_file_system(private_mounts, tiny_shards, tmp_path):
    """A read-only bind mount: the kernel returns EROFS to root too (chmod would not stop root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    prefix = in_namespace(private_mounts, f"mount --bind -o ro {ro} {ro}")
    res = run_cli(
        [PRETRAIN, *TINY_ARGS, "--data.shards", str(tiny_shards), "--train.output_dir", str(ro / "run")],
        prefix=prefix,
        timeout=120,
    )
    assert res.rc == 2 and len(res.errors) == 1 and "Traceback" not in res.stderr, res.tail()
    assert res.errors[0] == (
        f"error: --train.output_dir '{ro / 'run'}': read-only file system while creating the "
        "run directory; the file system is mounted read-only; choose a writable directory"
    )


CHECK_SPACE_OFF = textwrap.dedent("""
    # pretrain with the free-space check before each checkpoint switched off: the disk fills while
    # DeepSpeed writes (as when another job fills a shared file system between the check and the write)
    import sys
    from engine.trainer import checkpoint
    checkpoint.CheckpointManager._check_space = lambda self, tag: None
    sys.argv[0] = {launcher!r}
    from launchers.pretrain import main
    sys.exit(main())
""")


def test_disk_full_during_checkpoint_keeps_the_previous_one(private_mounts, tiny_shards, tmp_path):
    """A 4 MB tmpfs holds the run and one tiny checkpoint (2.5 MB), not two: the second save fails
    inside torch.save (a RuntimeError of its zip writer, diagnosed as ENOSPC), every rank stops with
    one line, the half-written checkpoint is removed and the first stays the resumable one."""
    run_dir, copy = tmp_path / "run", tmp_path / "copy"
    run_dir.mkdir()
    driver = tmp_path / "check_space_off.py"
    driver.write_text(CHECK_SPACE_OFF.format(launcher=PRETRAIN))
    prefix = in_namespace(private_mounts, f"mount -t tmpfs -o size=4m tmpfs {run_dir}", after=f"cp -a {run_dir} {copy}")
    res = run_cli(
        [
            str(driver),
            *TINY_ARGS,
            "--data.shards",
            str(tiny_shards),
            "--train.output_dir",
            str(run_dir),
            "--train.save_every",
            "1",
            "--train.max_steps",
            "20",
            "--train.export",
            "false",
        ],
        prefix=prefix,
    )
    assert res.rc == 2 and len(res.errors) == 1 and "Traceback" not in res.stderr, res.tail()
    assert res.errors[0].startswith(
        f"error: --train.output_dir '{run_dir}': no space left on device while writing "
        f"checkpoint {tag_for(2)}; free space there or choose another directory; the last "
        f"complete checkpoint ({tag_for(1)}) is intact"
    ), res.errors[0]
    ckdir = copy / "checkpoints"
    assert [s for s, _ in complete_checkpoints(ckdir)] == [1]
    assert (ckdir / "latest").read_text() == tag_for(1)
    assert not [p for p in ckdir.iterdir() if p.name.startswith(".tmp-")]
    state = torch.load(ckdir / tag_for(1) / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["step"] == 1 and state["module"]  # the previous checkpoint still loads


def test_free_space_check_refuses_a_checkpoint_that_cannot_fit(tmp_path, monkeypatch):
    """Before writing, the save compares the free space with the last checkpoint's size: a disk that
    cannot take another one fails with the same line and nothing is written."""
    import shutil
    from collections import namedtuple

    from engine.trainer.checkpoint import CheckpointManager, CheckpointWriteError
    from tests.engine.trainer.test_checkpoint import FakeEngine, _save

    mgr = CheckpointManager(tmp_path, rank=0, world_size=1)
    _save(mgr, FakeEngine(1.0), 1)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(
        CheckpointWriteError,
        match=r"no space left for checkpoint step_00000002 .*\(step_00000001\) "
        r"is intact",
    ):
        _save(mgr, FakeEngine(2.0), 2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == [tag_for(1)]
