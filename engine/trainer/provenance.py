"""What produced a run: git revision, package versions, command line, host -- saved in the run dir
and in every checkpoint so a result can be traced back to the code that made it."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def git_revision(root: Path = REPO_ROOT) -> str:
    """``<sha>`` of HEAD, ``<sha>-dirty`` with uncommitted changes, ``unknown`` outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def run_info(world_size: int, argv: list[str] | None = None) -> dict:
    """Provenance record for run.json."""
    import deepspeed
    import timm
    import torch

    return {
        "git": git_revision(),
        "argv": list(sys.argv if argv is None else argv),
        "host": platform.node(),
        "world_size": world_size,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "timm": timm.__version__,
    }


def write_run_json(output_dir: Path, world_size: int) -> None:
    """``<output_dir>/run.json`` (atomically): what produced this run (rank 0 calls it)."""
    from engine.atomic import atomic_write_text

    atomic_write_text(Path(output_dir) / "run.json", json.dumps(run_info(world_size), indent=1))
