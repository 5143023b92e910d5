"""The shared shape of our distributed CLI entry points (pretrain, finetune, evaluate).

``python launchers/X.py``, ``torchrun ... launchers/X.py`` and ``deepspeed launchers/X.py`` all land
in :func:`run_cli`: strip the launcher's ``--local_rank``, read ``--config PRESET`` + dotted
overrides into the run's config class, check the inputs before any process group exists (every
rank finds the same problem; rank 0 prints it, exit 2), join the process group, run, leave it.
"""
from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from engine.config_cli import parse_config_args
from engine.errors import UserError
from engine.progress import setup_logging

log = logging.getLogger(__name__)


def apply_kernel_config(cfg) -> None:
    """Hand ``cfg.kernels`` (``--kernels.lora``, ``--kernels.attention``) to ``kernels.dispatch``;
    the GEOEXPLORA_KERNELS / GEOEXPLORA_ATTENTION environment variables still take precedence."""
    from kernels import dispatch

    k = getattr(cfg, "kernels", None)
    if k is not None:
        dispatch.set_backend("lora_linear", k.lora)
        dispatch.set_backend("attention", k.attention)


def run_cli(config_cls: type, argv: Optional[Sequence[str]], run: Callable, check: Callable = lambda cfg: None,
            doc: str = "") -> int:
    """Parse, check, join the process group, ``run(cfg, env) -> exit code``, leave the group."""
    from engine.trainer.loop import NonFiniteLoss
    from engine.trainer.process_group import (RUNNER_OPTIONS, init_distributed, launcher_rank, shutdown,
                                              strip_launcher_args)

    raw = list(sys.argv[1:] if argv is None else argv)
    argv = strip_launcher_args(raw)
    rank = launcher_rank()
    setup_logging(rank)
    if any(a.split("=")[0] in RUNNER_OPTIONS for a in raw) and rank == 0:
        log.warning("runner options after the script (%s) reach the script, not the deepspeed runner, "
                    "which then uses every visible GPU; write them first: deepspeed --num_gpus 8 %s ...",
                    " ".join(a for a in raw if a.split("=")[0] in RUNNER_OPTIONS), Path(sys.argv[0]).name)
    try:
        cfg = parse_config_args(config_cls, argv, doc)  # -h/--help and --print-config print, then exit 0
        check(cfg)
    except UserError:
        if rank != 0:  # every rank found the same problem; rank 0 prints it
            sys.exit(2)
        raise
    apply_kernel_config(cfg)
    env = init_distributed()
    setup_logging(env.rank)
    try:
        return int(run(cfg, env) or 0)
    except NonFiniteLoss as e:
        log.error("%s", e)
        return 1
    finally:
        shutdown()


def exit_fast(code: int) -> None:
    """Exit with ``code`` once everything is written and closed.

    Interpreter shutdown would run full garbage-collection passes over the millions of objects
    torch/deepspeed (inductor, sympy) import: 4-7 s per rank, measured. Frozen objects are skipped
    by those passes; refcounted cleanup still happens.
    """
    gc.freeze()
    sys.exit(code)
