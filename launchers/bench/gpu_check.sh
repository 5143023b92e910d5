#!/usr/bin/env bash
# geoexplora one-shot GPU check (written for one H200; any single CUDA GPU works): in one command,
# within GX_BUDGET seconds (default 470, under 8 minutes),
#   1. the `gpu`-marked tests;
#   2. python -m kernels.verify: parity + speed per shape class -> the kernel record ($OUT/kernels.json),
#      which the later stages' `auto` then reads;
#   3. LoRA and attention benchmarks at ViT-L shapes in bf16, with CUDA-graph timings: Triton, the
#      fast torch path, the reference, the merged-weight candidate, PEFT; SDPA flash/cuDNN/efficient;
#   4. ViT-L/14 ExPLoRA DINOv2 training throughput (python -m launchers.bench.train --configs vitl: bf16,
#      batch 32, 2x224 + 8x98 crops, ZeRO-2, 20 steps after 3 warm-up steps), `auto` and forced
#      Triton: images/s, MFU, peak memory.
# Every stage runs under `timeout` (its cap, or what is left of the budget); all output lands in one
# folder, at its top level, 7 files: summary.txt pytest.log bench.log kernels.json bench_lora.json
# bench_attention.json bench_train.json.
#
#   bash launchers/bench/gpu_check.sh [OUTDIR]     # OUTDIR default: $OUT if set, else ./gpu_check_out
#   GX_SMOKE=1 bash launchers/bench/gpu_check.sh   # no GPU: every stage's CPU stand-in (interpreter,
#                                                # tiny shapes, 1 training step) to prove the plumbing
#   GX_SKIP=tests,train bash ...                 # leave stages out: tests, verify, bench, train
#   bash launchers/bench/gpu_check.sh --fetch-wheels   # on a machine with network: fill .whl (below)
#
# Environment: GX_PYTHON (default python3), GX_BUDGET, GX_WHEELS (default .whl), GX_SMOKE, GX_SKIP.
# Without CUDA (and without GX_SMOKE) it prints the environment and stops with exit code 3.
#
# Missing packages: a GPU machine may have torch/triton/timm/peft/pytest at other versions than our
# pins (fine) but no deepspeed, which only stage 4 needs, and no network. Bring wheels in .whl (in
# .git/info/exclude): `--fetch-wheels` builds deepspeed's pure-python wheel and downloads the
# dependencies a stock PyTorch image lacks or has too old (hjson, pydantic, pydantic-core,
# annotated-types, typing-inspection, typing_extensions; about 4 MB; the versions of our pinned
# environment). Stage 0 installs only the distributions that are absent or older than the wheel,
# into a private folder put on PYTHONPATH; nothing installed is touched. Nothing here changes GPU
# settings.
set -u
ROOT="${GX_ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}"
cd "$ROOT" || exit 2
PY="${GX_PYTHON:-python3}"
WHL="${GX_WHEELS:-$ROOT/.whl}"

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHL" || exit 2
  "$PY" -m pip wheel --no-deps --no-build-isolation -w "$WHL" deepspeed==0.19.8 || exit 1
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHL" hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing_extensions==4.16.0 || exit 1
  ls -la "$WHL"
  exit 0
fi

[ -f kernels/attention.py ] && [ -f launchers/bench/train.py ] || { echo "run from the geoexplora tree"; exit 2; }
OUT="${1:-${OUT:-$ROOT/gpu_check_out}}"
mkdir -p "$OUT" || exit 2
SMOKE="${GX_SMOKE:-0}"
BUDGET="${GX_BUDGET:-$([ "$SMOKE" = 1 ] && echo 150 || echo 470)}"
SKIP=",${GX_SKIP:-},"
WORK=$(mktemp -d -t gx_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export GEOEXPLORA_KERNEL_RECORD="$OUT/kernels.json"   # stage 2 writes it, stage 4's auto reads it
unset TRITON_INTERPRET GEOEXPLORA_KERNELS GEOEXPLORA_ATTENTION
[ "$SMOKE" = 1 ] && export DS_ACCELERATOR=cpu || unset DS_ACCELERATOR
SUM="$OUT/summary.txt"; LOG="$OUT/bench.log"
: > "$SUM"; : > "$LOG"; : > "$OUT/pytest.log"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
note() { echo "$*" | tee -a "$SUM"; }
skipped() { case "$SKIP" in *",$1,"*) note "SKIP  $1 (GX_SKIP)"; return 0;; esac; return 1; }
# stage NAME CAP LOGFILE cmd...: run under timeout min(CAP, time left - 5); record rc and seconds.
stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local t; t=$(( $(left) - 5 )); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 10 ]; then note "SKIP  $name (only $(left)s of the budget left)"; return 99; fi
  local t0; t0=$(date +%s)
  echo "=== $name (timeout ${t}s): $*" >> "$log"
  timeout -k 10 "$t" "$@" >> "$log" 2>&1
  local rc=$?
  local msg="rc=$rc"; { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && msg="TIMEOUT after ${t}s"
  note "$(printf '%-5s %-16s %-20s %4ss' "$([ $rc -eq 0 ] && echo OK || echo FAIL)" "$name" "$msg" $(( $(date +%s) - t0 )))"
  return $rc
}

# ---- 0. environment; missing packages from carried wheels --------------------------------------
{
  echo "# geoexplora GPU check$([ "$SMOKE" = 1 ] && echo ' (SMOKE: CPU stand-ins, no figure is a GPU figure)'), $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv,noheader 2>&1 | head -2
  timeout 120 "$PY" - <<'EOF' 2>&1
import importlib, sys
import torch
cuda = torch.cuda.is_available()
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda, "| device",
      torch.cuda.get_device_name() if cuda else "none", torch.cuda.get_device_capability() if cuda else "")
for m in ("triton", "timm", "peft", "deepspeed", "xdist", "pytest_timeout", "pytest"):
    try:
        print(f"  {m} {getattr(importlib.import_module(m), '__version__', 'ok')}")
    except Exception as e:  # noqa: BLE001
        print(f"  {m} MISSING ({type(e).__name__})")
EOF
} | tee -a "$SUM"
if [ "$SMOKE" != 1 ] && ! timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "no CUDA device: stop (GX_SMOKE=1 runs the CPU stand-ins)"; exit 3
fi
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  SITE="$WORK/site"
  timeout 120 "$PY" - "$WHL" "$SITE" <<'EOF' 2>&1 | tee -a "$SUM"
import importlib.metadata as md, pathlib, subprocess, sys
from packaging.version import Version
whl, site = pathlib.Path(sys.argv[1]), sys.argv[2]
missing = []
for w in sorted(whl.glob("*.whl")):
    name, version = w.name.split("-")[:2]
    try:
        if Version(md.version(name)) >= Version(version):
            continue
    except md.PackageNotFoundError:
        pass
    missing.append(str(w))
if missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--target", site, *missing], check=True)
print("installed from wheels:", ", ".join(pathlib.Path(m).name for m in missing) or "nothing (all present)")
EOF
  [ -d "$SITE" ] && export PYTHONPATH="$PYTHONPATH:$SITE"
fi

# ---- 1. gpu-marked tests -----------------------------------------------------------------------
if ! skipped tests; then
  PT=(-m pytest -q -m gpu -p no:cacheprovider -rfE --durations=8 tests/kernels tests/engine/model/test_attention.py)
  if [ "$SMOKE" != 1 ]; then  # compile-bound: Triton/Inductor compiles run in parallel
    "$PY" -c "import xdist" 2>/dev/null && PT+=(-n 8)
    "$PY" -c "import pytest_timeout" 2>/dev/null && PT+=(--timeout 100)
  fi
  stage gpu_tests 120 "$OUT/pytest.log" "$PY" "${PT[@]}"
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped|error)" "$OUT/pytest.log" | tail -12 >> "$SUM"
fi

# ---- 2. kernels.verify -> the kernel record ------------------------------------------------------
if ! skipped verify; then
  if [ "$SMOKE" = 1 ]; then
    stage verify 60 "$LOG" "$PY" -m kernels.verify --interpret
  else  # the shape classes stage 4 meets (ViT-L, r=64 on q,v, 2x224 + 8x98 crops) and fc1/fc2/proj
    stage verify 75 "$LOG" "$PY" -m kernels.verify --models vitl --ranks 64 --tokens 16448 --seq-lens 50,257
  fi
  grep -E "^wrote .*shape classes" "$LOG" | tail -1 >> "$SUM"
fi

# ---- 3. microbenchmarks at ViT-L shapes, bf16, with CUDA-graph timings --------------------------
if ! skipped bench; then
  if [ "$SMOKE" = 1 ]; then
    stage bench_lora 40 "$LOG" "$PY" -m launchers.bench.lora_linear --device cpu --cases "64,32,96,8,qv" \
      --modes fwd_bwd --iters 1 --no-interpreter-row --out "$OUT/bench_lora.json"
    stage bench_attention 40 "$LOG" "$PY" -m launchers.bench.attention --device cpu --shapes "1,2,17,16" \
      --modes fwd_bwd --iters 1 --no-interpreter-row --out "$OUT/bench_attention.json"
  else
    # LoRA: qkv(q,v) r=64 at the global (32 x 2 x 257) and local (32 x 8 x 50) crops' rows; fc1 r=64; proj r=8
    stage bench_lora 60 "$LOG" "$PY" -m launchers.bench.lora_linear --dtype bf16 --modes fwd_bwd --cuda-graph \
      --providers triton,torch,reference,merged,peft --baseline torch \
      --cases "16448,1024,3072,64,qv;12800,1024,3072,64,qv;16448,1024,4096,64;16448,1024,1024,8" \
      --out "$OUT/bench_lora.json"
    # attention: the same crops, 16 heads of 64
    stage bench_attention 50 "$LOG" "$PY" -m launchers.bench.attention --dtype bf16 --modes fwd,fwd_bwd --cuda-graph \
      --providers triton,sdpa-flash,sdpa-cudnn,sdpa-efficient --baseline sdpa-flash \
      --shapes "64,16,257,64;256,16,50,64" --out "$OUT/bench_attention.json"
  fi
fi

# ---- 4. training throughput: auto (reads the record) vs forced Triton --------------------------
if ! skipped train; then
  if [ "$SMOKE" = 1 ]; then
    BT=(-m launchers.bench.train --configs tiny --stages 2 --nproc 1 --steps 1 --warmup 1 --memory-models "")
    MODES=(auto)
  else
    BT=(-m launchers.bench.train --configs vitl --stages 2 --nproc 1 --steps 20 --warmup 3
        --memory-models vit_large_patch14_dinov2)
    MODES=(auto triton)
  fi
  if timeout 60 "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    for mode in "${MODES[@]}"; do
      if [ "$mode" = triton ]; then
        stage "train_$mode" 100 "$LOG" env GEOEXPLORA_KERNELS=triton "$PY" "${BT[@]}" --out "$WORK/bt_$mode.json"
      else
        stage "train_$mode" 100 "$LOG" "$PY" "${BT[@]}" --out "$WORK/bt_$mode.json"
      fi
    done
    timeout 60 "$PY" - "$WORK" "$OUT/bench_train.json" <<'EOF' 2>&1 | tee -a "$SUM"
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
res = {p.stem[3:]: json.loads(p.read_text()) for p in sorted(work.glob("bt_*.json"))}
out.write_text(json.dumps(res, indent=1))
for mode, v in res.items():
    for r in v.get("runs", []):
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
        print(f"train {mode:6} {r['config']} ZeRO-{r['stage']}: {r['images_per_s']:.1f} img/s, MFU {mfu}, "
              f"peak {r['peak_mem_gb']} GB, {r['timed_steps']} timed steps")
EOF
  else
    note "SKIP  train: deepspeed does not import (bring wheels: bash launchers/bench/gpu_check.sh --fetch-wheels)"
  fi
fi

# ---- summary (the end of the output is the part most worth reading) ------------------------------
note "total $(( $(date +%s) - START ))s of ${BUDGET}s budget"
echo "---- verify / bench (tail) ----"
grep -E "^(lora_linear|attention)\||^(triton|torch|reference|merged|peft|sdpa)" "$LOG" | cut -c1-190 | tail -40
echo "---- summary ----"; cat "$SUM"
