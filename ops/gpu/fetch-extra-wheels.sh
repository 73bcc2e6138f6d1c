#!/usr/bin/env bash
# Download the wheels the lent GPU machine needs for zhuge's GPU checks beyond what
# it has and beyond the shared wheel sets (../shared/gpu/fetch-wheels.sh), for
# Python 3.12 x86-64, into DEST (default .whl) under the project root.
#
# Usage (in the project root, after ../shared/gpu/fetch-wheels.sh COMBO DEST):
#   ops/gpu/fetch-extra-wheels.sh infer|train [DEST]
#
#   common: what `python -m app.cli` (typer, which imports pydantic), the retrain
#           command (rich, fsspec) and the GPU tests (msgspec via streams.schema)
#           import; none of them is on the machine.
#   infer:  + xgboost-cpu (the `infer` set has no XGBoost, but the bench fits its
#           bootstrap model with XGBoost on the CPU and the GPU tests train boosters;
#           inference then runs in nvforest). pygments (typer's error formatter) comes with
#           the machine's pytest (a hard dependency since pytest 8.4).
#   train:  + a Bitbrains subset copied to .gpu-data/bitbrains (the device has no
#           ../shared). XGBoost comes with the shared `train` set.
# Never mix combos in one DEST: both put a module named `xgboost` there.
# A device call carries at most 64 MiB in all: the script prints the total and fails above 63 MiB.
set -euo pipefail
combo=${1:?infer|train}
dest=${2:-.whl}
data_vms=${ZHUGE_GPU_DATA_VMS:-8}   # Bitbrains VMs copied for `train` (~110 kB each)
[ -d .git ] || { echo "run this in the project root" >&2; exit 2; }

common=(msgspec==0.22.0 typer==0.29.2 annotated-doc==0.0.7 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 shellingham==1.5.4
        rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 fsspec==2026.9.0 pytest-timeout==2.4.0)
case "$combo" in
  infer) pkgs=("${common[@]}" xgboost-cpu==3.4.1) ;;
  train) pkgs=("${common[@]}") ;;
  *) echo "unknown combo: $combo (infer|train)" >&2; exit 2 ;;
esac

mkdir -p "$dest"
grep -qxF "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >> .git/info/exclude
if [ "$combo" = infer ] && compgen -G "$dest/xgboost-*.whl" >/dev/null; then
  echo "$dest holds the CUDA xgboost wheel of the train set: use a fresh DEST for infer" >&2; exit 2
fi
if [ "$combo" = train ] && compgen -G "$dest/xgboost_cpu-*.whl" >/dev/null; then
  echo "$dest holds xgboost-cpu from the infer combo: use a fresh DEST for train" >&2; exit 2
fi

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${pkgs[@]}"

carried=("$dest")
if [ "$combo" = train ]; then
  src=${ZHUGE_DATA_DIR:-../shared/data}/bitbrains-rnd-2013-08
  data=.gpu-data/bitbrains
  if [ -d "$src" ]; then
    rm -rf "$data" && mkdir -p "$data"
    for i in $(seq 1 "$data_vms"); do cp "$src/$i.csv.gz" "$data/"; done
    grep -qxF "/.gpu-data/" .git/info/exclude || echo "/.gpu-data/" >> .git/info/exclude
    carried+=(.gpu-data)
  else
    echo "warning: $src not found: the retrain step will fail without $data" >&2
  fi
fi

bytes=$(find "${carried[@]}" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
awk -v b="$bytes" -v p="${carried[*]}" 'BEGIN {printf "carry %s: %.2f MiB (%d bytes)\n", p, b / 1048576, b}'
if [ "$bytes" -gt $((63 * 1048576)) ]; then
  echo "too large for one device call (64 MiB carry, keep ~1 MiB spare): lower ZHUGE_GPU_DATA_VMS" >&2
  exit 1
fi
list=$(printf '"%s", ' "${carried[@]}")
echo "run tool: carry=[${list%, }]"
