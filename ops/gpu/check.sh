#!/usr/bin/env bash
# zhuge's GPU checks in one call on the lent GPU machine (see ops/gpu/README.md).
# Usage, in the project root with .whl/ alongside:  ops/gpu/check.sh infer|train
#   install  wheels from .whl/ into /tmp/site (no network there), PYTHONPATH=/tmp/site:$PWD
#   env      nvidia-smi -L, versions, which modules import
#   pytest   every test marked `gpu` (files found by grep, so collection imports nothing else)
#   bench    zhuge bench score, 1M VMs x 288 slots on the GPU, CPU timed on a sample; acceptance
#   retrain  (train only) zhuge retrain --format bitbrains on LocalCUDACluster, data in .gpu-data/bitbrains
# A failed step is reported and the next one still runs; exit 1 if any step failed.
# Everything printed also lands in $OUT (default ./.gpu-out): check.log, per-step files.
# ZHUGE_GPU_CHECK_DRY=1: no pip install, use the current python (a venv), small sizes, CPU
# where no GPU is seen: a rehearsal of the script itself on a CPU machine.
set -uo pipefail
phase=${1:?infer|train}
case "$phase" in infer|train) ;; *) echo "phase must be infer or train" >&2; exit 2 ;; esac
cd "$(dirname "$0")/../.." || exit 2
OUT=${OUT:-$PWD/.gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/check.log") 2>&1
dry=${ZHUGE_GPU_CHECK_DRY:-0}
wheels=${ZHUGE_GPU_WHEELS:-.whl}
data=${ZHUGE_GPU_CHECK_DATA:-.gpu-data/bitbrains}
vms=${ZHUGE_GPU_CHECK_VMS:-1000000}
cpu_sample=${ZHUGE_GPU_CHECK_CPU_SAMPLE:-20000}
t_pytest=${ZHUGE_GPU_CHECK_T_PYTEST:-150}
t_bench=${ZHUGE_GPU_CHECK_T_BENCH:-200}
t_retrain=${ZHUGE_GPU_CHECK_T_RETRAIN:-200}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export ZHUGE_MODEL_STORE=${ZHUGE_MODEL_STORE:-/tmp/zhuge-gpu-check/models}
failed=()

step() {  # step NAME CMD...: run, report, remember a failure, go on
  local name=$1; shift
  echo; echo "=== [$phase] $name: $* ($(date -u +%H:%M:%S))"
  local t0=$SECONDS
  "$@"; local rc=$?
  echo "=== [$phase] $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (rc $rc)") in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed+=("$name")
  return 0
}

if [ "$dry" = 1 ]; then
  PY=$(command -v python || command -v python3)
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  echo "DRY RUN: no wheel install; python $PY"
else
  PY=python3
  install() {
    compgen -G "$wheels/*.whl" >/dev/null || { echo "no wheels in $wheels/"; return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
  }
  step install install
  export PYTHONPATH=/tmp/site:$PWD
fi

env_report() {
  nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
  "$PY" - "$phase" <<'EOF'
import importlib, importlib.metadata as md, sys, platform
phase = sys.argv[1]
print("python", platform.python_version(), sys.executable)
mods = ["numpy", "cupy", "xgboost", "typer", "pydantic", "rich", "pygments", "msgspec", "fsspec", "pandas", "pytest"]
mods += ["nvforest", "treelite"] if phase == "infer" else ["dask", "distributed", "dask_cuda", "pynvml", "cuda.core"]
missing = []
for m in mods:
    try:
        mod = importlib.import_module(m)
        print(f"  {m:12s} {getattr(mod, '__version__', '?'):14s} {getattr(mod, '__file__', '')}")
    except Exception as exc:  # report every missing module, not only the first
        missing.append(m)
        print(f"  {m:12s} MISSING ({type(exc).__name__}: {exc})")
from gpu_kernels.xp import gpu_available
from gpu_kernels.inference import engine_name
gpu = gpu_available()
if gpu:
    import cupy
    print("GPU:", cupy.cuda.runtime.getDeviceCount(), "device(s);", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
          "; GPU engine:", engine_name("gpu"))
else:
    print("NO GPU: CuPy is missing or sees no CUDA device; gpu tests will skip and GPU steps fail")
sys.exit(1 if missing or not gpu else 0)
EOF
}
step env env_report

run_pytest() {
  local files; files=$(grep -rlE "mark\.gpu\b" tests --include='test_*.py' | sort)
  echo "gpu test files: $files"
  # shellcheck disable=SC2086
  timeout -k 10 "$t_pytest" "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu --junitxml="$OUT/pytest-$phase.xml" $files
}
step pytest run_pytest

run_bench() {
  local dev=gpu n=$vms sample=$cpu_sample
  if [ "$dry" = 1 ] && ! "$PY" -c 'from gpu_kernels.xp import gpu_available as g; raise SystemExit(not g())'; then
    echo "DRY RUN without a GPU: first the real GPU command must refuse cleanly, then a small CPU run"
    "$PY" -m app.cli bench score --vms 1000 --slots 288 --device gpu --json && return 1
    echo "(refused as expected)"
    dev=cpu n=2000 sample=1000
  fi
  timeout -k 10 "$t_bench" "$PY" -m app.cli bench score --vms "$n" --slots 288 --device "$dev" --compare-cpu \
    --cpu-sample "$sample" --json > "$OUT/bench-$phase.json" || return 1
  cat "$OUT/bench-$phase.json"
  "$PY" - "$OUT/bench-$phase.json" "$dev" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
runs = {t["device"]: t for t in r["runs"]}
for d, t in runs.items():
    print(f"{d} ({t['engine']}): {t['wall_s']:.3f} s for {t['vms']:,} VMs x {r['slots']} slots"
          + (f" [extrapolated from {t['extrapolated_from']:,}]" if t["extrapolated_from"] else ""))
if sys.argv[2] != "gpu":
    sys.exit(0)
g, x = runs["gpu"]["wall_s"], r["gpu_over_cpu"] or 0.0
ok_t, ok_x = g < 5.0 and r["vms"] >= 1_000_000, x >= 100.0
print(f"ACCEPTANCE gpu step {g:.3f} s < 5 s for >= 1M VMs: {'PASS' if ok_t else 'FAIL'}; "
      f"speed-up {x:.1f}x >= 100x: {'PASS' if ok_x else 'FAIL'}")
sys.exit(0 if ok_t and ok_x else 1)
EOF
}
step bench run_bench

run_retrain() {
  [ -d "$data" ] || { echo "no $data: copy Bitbrains VMs there first (ops/gpu/fetch-extra-wheels.sh train does)"; return 1; }
  echo "$(ls "$data" | wc -l) Bitbrains VMs in $data; model store $ZHUGE_MODEL_STORE"
  rm -rf "$ZHUGE_MODEL_STORE"
  local dev=gpu
  if [ "$dry" = 1 ]; then dev=auto; fi
  timeout -k 20 "$t_retrain" "$PY" -m app.cli --device "$dev" retrain --format bitbrains --path "$data"
}
probe_cluster() {  # does the retrain see its cluster as GPU (fits with device=cuda) or not?
  local dev=gpu; if [ "$dry" = 1 ]; then dev=auto; fi
  local probe=/tmp/zhuge-gpu-check/probe_cluster.py  # a file: the workers are spawned processes
  mkdir -p "${probe%/*}"
  cat > "$probe" <<'EOF'
import sys
from training.retrain import RetrainConfig, _cluster_has_gpu, open_client
if __name__ == "__main__":
    client, cluster = open_client(RetrainConfig(n_workers=1), sys.argv[1])
    try:
        gpu = _cluster_has_gpu(client)
        print(f"cluster {type(cluster).__name__}: retrain fits on {'GPU (device=cuda)' if gpu else 'CPU'}")
    finally:
        client.close(); cluster.close()
    sys.exit(0 if gpu or sys.argv[1] != "gpu" else 1)
EOF
  timeout -k 10 90 "$PY" "$probe" "$dev"
}
if [ "$phase" = train ]; then step cluster probe_cluster; step retrain run_retrain; fi

echo
if [ ${#failed[@]} -eq 0 ]; then
  echo "=== [$phase] ALL STEPS OK"; exit 0
fi
echo "=== [$phase] FAILED STEPS: ${failed[*]}"; exit 1
