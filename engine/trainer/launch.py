"""The shared shape of our distributed CLI entry points (pretrain, finetune, evaluate).

``python launchers/X.py``, ``torchrun ... launchers/X.py`` and ``deepspeed launchers/X.py`` all land
in :func:`run_cli`: strip the launcher's ``--local_rank``, read ``--config PRESET`` + dotted
overrides into the run's config class, check the inputs before any process group exists (every
rank finds the same problem; rank 0 prints it, exit 2), join the process group, run, leave it.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.config_cli import parse_config_args
from engine.errors import UserError, fs_user_error, probe_writable
from engine.progress import setup_logging
from engine.trainer.supervise import register_rank, report_exit

log = logging.getLogger(__name__)


def launcher_rank() -> int:
    """Global rank from the launcher's environment, before any process group exists (0 if none)."""
    return int(os.environ.get("RANK", "0"))


# Runner options that reach the script when written after it (``deepspeed x.py --num_gpus 8``): the
# runner then used every visible GPU, and the script has nothing to do with them.
RUNNER_OPTIONS = ("--num_gpus", "--num_nodes", "--num-gpus", "--num-nodes")


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank N`` / ``--local_rank=N``, which the deepspeed launcher appends (LOCAL_RANK
    in the environment carries the same information), and deepspeed runner options written after
    the script (``--num_gpus 8``; see :data:`RUNNER_OPTIONS`)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in ("--local_rank", "--local-rank") + RUNNER_OPTIONS:
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        if a.startswith(tuple(f"{o}=" for o in ("--local_rank", "--local-rank") + RUNNER_OPTIONS)):
            continue
        out.append(a)
    return out


PREFLIGHT_FLAG = "--preflight"


def take_preflight_flag(argv: Sequence[str]) -> tuple[list[str], int]:
    """Remove ``--preflight``, ``--preflight=N`` or ``--preflight N`` from ``argv``; returns
    (remaining argv, samples per rank, 0 = no preflight)."""
    rest, samples, i = [], 0, 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a == PREFLIGHT_FLAG:
            samples = 1
            if i + 1 < len(argv) and argv[i + 1].isdigit():
                samples = int(argv[i + 1])
                i += 1
        elif a.startswith(PREFLIGHT_FLAG + "="):
            value = a.split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"{PREFLIGHT_FLAG}: expected a number of samples per rank >= 1, got {value!r}")
            samples = int(value)
        else:
            rest.append(a)
        i += 1
    return rest, samples


def apply_kernel_config(cfg) -> None:
    """Hand ``cfg.kernels`` (``--kernels.lora``, ``--kernels.attention``) to ``kernels.dispatch``;
    the GEOEXPLORA_KERNELS / GEOEXPLORA_ATTENTION environment variables still take precedence."""
    from kernels import dispatch

    k = getattr(cfg, "kernels", None)
    if k is not None:
        dispatch.set_backend("lora_linear", k.lora)
        dispatch.set_backend("attention", k.attention)


def output_dir_of(cfg) -> tuple[str, str] | None:
    """(run directory, its flag) of a run config: ``train.output_dir`` or ``eval.output_dir``."""
    for section in ("train", "eval"):
        out = getattr(getattr(cfg, section, None), "output_dir", None)
        if out:
            return out, f"--{section}.output_dir"
    return None


def check_output_dir(cfg) -> None:
    """For a launcher's check, before any process group: the run directory can take files (created
    if missing), so a path below a regular file or on a read-only or full file system fails here,
    on every rank alike."""
    found = output_dir_of(cfg)
    if found is None:
        return
    out, flag = found
    cause = probe_writable(out)
    if cause is not None:
        raise fs_user_error(cause, out, flag, "creating the run directory") or UserError(
            f"{flag} '{out}': cannot write there ({cause.strerror}); choose another directory"
        )
    train = getattr(cfg, "train", None)
    if train is not None and getattr(train, "resume", None) == "none":
        from engine.trainer.checkpoint import complete_checkpoints

        old = complete_checkpoints(Path(out) / "checkpoints")
        if old:  # a fresh run would interleave its steps with these: 'auto' and pruning go by step
            raise UserError(
                f"--train.resume none: {flag} '{out}' holds {len(old)} checkpoint(s) of an earlier run "
                f"(newest step {old[-1][0]}); a fresh run there would mix its checkpoints with them. "
                "Use a new --train.output_dir, delete its checkpoints/ folder, or --train.resume auto to continue it"
            )


def _run_dir_error(err: Exception, cfg) -> UserError | None:
    """A write error inside the run directory (disk full, read-only, ...) as one line, else None.

    An OSError that names a file counts when the file is inside the run directory. One that names
    none (a write on an open file), or a RuntimeError (torch.save's zip writer reports a full disk
    so), counts when the run directory itself no longer takes a new file."""
    found = output_dir_of(cfg)
    if found is None:
        return None
    out, flag = found
    if isinstance(err, OSError) and err.filename is not None:
        inside = Path(os.path.abspath(err.filename)).is_relative_to(os.path.abspath(out))
        return fs_user_error(err, out, flag, "writing the run directory") if inside else None
    cause = probe_writable(out)
    return None if cause is None else fs_user_error(cause, out, flag, "writing the run directory")


def run_cli(
    config_cls: type, argv: Sequence[str] | None, run: Callable, check: Callable = lambda cfg: None, doc: str = ""
) -> int:
    """Parse, check, join the process group, ``run(cfg, env) -> exit code``, leave the group.

    Exit codes: what ``run`` returns (0 finished, 128 + N stopped by signal N after a checkpoint),
    1 NaN/inf halt (one ``error:`` line from rank 0), 2 bad input or a run directory that cannot be
    written (a UserError: ``error: ...``), 130 Ctrl-C twice. Local rank 0 reports the code to
    :mod:`engine.trainer.supervise` when one runs the launcher.
    """
    register_rank()
    raw = list(sys.argv[1:] if argv is None else argv)
    argv = strip_launcher_args(raw)
    rank = launcher_rank()
    setup_logging(rank)
    if any(a.split("=")[0] in RUNNER_OPTIONS for a in raw) and rank == 0:
        log.warning(
            "runner options after the script (%s) reach the script, not the deepspeed runner, "
            "which then uses every visible GPU; write them first: deepspeed --num_gpus 8 %s ...",
            " ".join(a for a in raw if a.split("=")[0] in RUNNER_OPTIONS),
            Path(sys.argv[0]).name,
        )
    try:
        cfg = parse_config_args(config_cls, argv, doc)  # -h/--help and --print-config print, then exit 0
        check(cfg)
    except UserError:
        report_exit(2)
        if rank != 0:  # every rank found the same problem; rank 0 prints it
            sys.exit(2)
        raise
    # torch and the process group only now: --help and --print-config (handled above) stay fast
    from engine.trainer.loop import NonFiniteLoss
    from engine.trainer.process_group import init_distributed, shutdown

    apply_kernel_config(cfg)
    env = init_distributed()
    setup_logging(env.rank)
    code: int | None = None
    together = False  # every rank ends here at once: finished, stopped at an agreed step, or NaN halt
    try:
        code = int(run(cfg, env) or 0)
        together = True
    except NonFiniteLoss as e:  # decided from an all-reduced flag: the same step on every rank
        together = True
        if env.is_main:
            print(f"error: {e}", file=sys.stderr)
        code = 1
    except UserError as e:
        code = 2
        if getattr(e, "all_ranks", False) and not env.is_main:
            sys.exit(2)  # the same message on every rank (e.g. a checkpoint write): rank 0 prints it
        raise
    except (OSError, RuntimeError) as e:
        user = _run_dir_error(e, cfg)
        if user is None:
            raise
        code = 2
        raise user from None
    except KeyboardInterrupt:
        code = 130
        raise
    finally:
        shutdown(clean=together)
        if code is not None:
            report_exit(code)
    return code


def exit_fast(code: int) -> None:
    """Exit with ``code`` once everything is written and closed.

    Interpreter shutdown would run full garbage-collection passes over the millions of objects
    torch/deepspeed (inductor, sympy) import: 4-7 s per rank, measured. Frozen objects are skipped
    by those passes; refcounted cleanup still happens.
    """
    gc.freeze()
    sys.exit(code)
