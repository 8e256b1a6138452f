#!/usr/bin/env bash
# bench/gpu_throughput.py on a GPU machine that has JAX (or PyTorch) with CUDA but no TensorFlow:
# Keras 3 runs models/networks.py on either backend once its wheels are there.
#
# Once, on a machine with the package registry, in the repository's root (the pinned versions of
# requirements.lock, for the GPU machine's Python 3.12 on x86-64):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0
# Then, on the GPU machine, with .whl carried beside the checkout:
#   bash bench/gpu_device.sh OUT_DIR [bf16|fp32|torch]...
# Each part appends to OUT_DIR/gpu.jsonl as it measures and prints its tables; gpu.md at the end
# holds the tables of everything measured. Each part is one device call's worth (10 minutes at
# most): on a 15-minute lease, run bf16 first and fp32 in a second call if the first took long.
#   bf16   the three networks in bfloat16: the paper's batch, twice it, the largest that fits
#   fp32   the three networks in float32, at the paper's batch and twice it
#   torch  Keras on PyTorch, Xception at the paper's batch in both precisions, for comparison
# Default: bf16 fp32. A JAX compilation cache in /tmp makes a rerun on the same machine skip the
# compiles.
set -euo pipefail
out=${1:?usage: bash bench/gpu_device.sh OUT_DIR [bf16|fp32|torch]...}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)  # before the cd below: a relative OUT_DIR is the caller's
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then parts=(bf16 fp32); else parts=("$@"); fi
if [ -d .whl ]; then  # where Keras is installed already (a CPU check), nothing to carry
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || echo "no GPU"; } \
  | tee "$out/gpu.txt"
# BENCH_ARGS, appended to every part's flags, shrinks a check run: --size 72 --steps 2 ...
bench() { python3 -m bench.gpu_throughput --out "$out/gpu.jsonl" "$@" ${BENCH_ARGS:-}; }
rc=0  # a part with a failed measurement does not stop the others: its failures are in the tables
for part in "${parts[@]}"; do
  case $part in
    bf16) KERAS_BACKEND=jax bench --precisions bfloat16 --doublings 3 || rc=1 ;;
    fp32) KERAS_BACKEND=jax bench --precisions none --doublings 1 || rc=1 ;;
    torch) KERAS_BACKEND=torch bench --networks xception --precisions none,bfloat16 --doublings 0 --jit false || rc=1 ;;
    *) echo "unknown part $part: expected bf16, fp32 or torch" >&2; exit 2 ;;
  esac
done
python3 -m bench.gpu_throughput --summarize "$out/gpu.jsonl" | tee "$out/gpu.md" || rc=1
exit $rc
