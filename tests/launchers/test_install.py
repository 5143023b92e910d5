"""Installing the package: into an environment with another torch (kept), as a non-editable install
(presets and console scripts ship), and the console script / module under the deepspeed runner.

One throwaway venv for the module: torch 2.13.0 + torchvision 0.28.0 (an older matching pair, as an
existing GPU environment has; --no-deps, no bytecode: seconds from the machine's local wheels), and a
``.pth`` line that makes this interpreter's site-packages visible behind them (the other dependencies
at their tested versions). pip then resolves ``pip install .`` with --dry-run --no-index: offline,
against what is installed, so the result reflects setup.py's requirements, not the index of the day.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from engine.trainer.process_group import free_port

REPO = Path(__file__).resolve().parents[2]
OTHER_TORCH = ("torch==2.13.0", "torchvision==0.28.0")
PIP_TIMEOUT = 300


def _pip(venv: Path, *args: str, cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "--disable-pip-version-check", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=PIP_TIMEOUT)


def _source_copy(dest: Path) -> Path:
    """The package sources without build outputs (pip builds in the source tree)."""
    for name in ("engine", "kernels", "launchers", "shards"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "setup.py", dest / "setup.py")
    return dest


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    pytest.importorskip("setuptools")  # builds with --no-build-isolation (offline)
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    got = _pip(venv, "install", "--no-deps", "--no-compile", "--timeout", "20", "--retries", "1", *OTHER_TORCH)
    if got.returncode != 0:
        tail = (got.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"wheels of {' and '.join(OTHER_TORCH)} unavailable here: {tail}")
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    Path(site, "zz_tested_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv, _source_copy(root / "src")


def test_pip_install_keeps_the_environments_torch(venv):
    venv, src = venv
    report = src.parent / "report.json"
    got = _pip(
        venv, "install", "--dry-run", "--no-index", "--no-build-isolation", "--report", str(report), ".", cwd=src
    )
    assert got.returncode == 0, f"pip cannot install next to {OTHER_TORCH}:\n{got.stderr[-3000:]}"
    plan = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert "geoexplora" in plan
    assert not {"torch", "torchvision", "triton"} & set(plan), f"pip would replace {plan}"


def test_non_editable_install_ships_presets_and_console_scripts(venv, tmp_path):
    venv, src = venv
    got = _pip(venv, "install", "--no-deps", "--no-index", "--no-build-isolation", "--no-compile", ".", cwd=src)
    assert got.returncode == 0, got.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import engine.presets as p, torch; print(p.resolve_preset('explora_dinov2_vitl14_fmow_rgb'));"
            "print(len(p.preset_names())); print(torch.__version__)",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    path, count, torch_version = where.stdout.split()
    assert path.startswith(str(venv)) and Path(path).is_file() and torch_version.startswith("2.13.0")
    assert int(count) == len(list((REPO / "engine" / "presets").glob("*.yaml")))
    for name in ("pretrain", "finetune", "evaluate", "params", "demo", "convert"):
        assert (venv / "bin" / f"geoexplora-{name}").is_file()
    shown = subprocess.run(
        [str(venv / "bin" / "geoexplora-pretrain"), "--config", "tiny_cpu", "--print-config", "--train.max_steps", "7"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "max_steps: 7" in shown.stdout and "name: tiny" in shown.stdout


@pytest.mark.parametrize("form", ["script", "module"])
def test_deepspeed_runner_accepts_the_console_script_and_the_module(venv, tmp_path, form):
    """``deepspeed $(which geoexplora-pretrain) ...`` and ``deepspeed --module launchers.pretrain ...``:
    the runner starts the rank, which parses its argv (plus the runner's --local_rank) and answers."""
    venv, _ = venv
    target = [str(venv / "bin" / "geoexplora-pretrain")] if form == "script" else ["--module", "launchers.pretrain"]
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "1",
        "--master_port",
        str(free_port()),
        *target,
        "--config",
        "tiny_cpu",
        "--print-config",
        "--train.max_steps",
        "7",
    ]
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("RANK", None)
    got = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.count("max_steps: 7") == 1, got.stdout[-3000:]
