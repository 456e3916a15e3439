#!/usr/bin/env bash
# Runs on a GPU machine, from the repo root, with gpu-bin/ (from
# scripts/gpu/build-binaries.sh) beside it: the GPU-vs-CPU tests (none may skip),
# then the CUDA benches. Everything lands in $OUT (default /tmp/sentence-mtl-gpu).
set -uo pipefail
OUT=${OUT:-/tmp/sentence-mtl-gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
date -u

# The CUDA libraries the binaries link (cuBLAS, cuRAND, NVRTC, cudart): from the
# machine's Python NVIDIA wheels, or a CUDA install, whichever holds them.
libdirs=$(find / -xdev \( -name 'libcublas.so.13*' -o -name 'libcurand.so.10*' \
  -o -name 'libnvrtc.so.13*' -o -name 'libcudart.so.13*' \) 2>/dev/null \
  | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH=${libdirs}${LD_LIBRARY_PATH:-}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

BIN=/tmp/sentence-mtl-bin
rm -rf "$BIN" && mkdir -p "$BIN"
tar -C "$BIN" -xzf gpu-bin/binaries.tar.gz
ls -l "$BIN/bin"
ldd "$BIN/bin/gpu" | grep -E "cuda|cublas|curand|nvrtc|not found" || true

echo "== GPU tests"
SENTENCE_MTL_REQUIRE_GPU=1 "$BIN/bin/gpu" --test-threads=1 2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== CUDA benches"
(cd "$BIN" && timeout "${BENCH_TIMEOUT:-360}" "$BIN/bin/cuda_ops" --bench --noplot \
  --warm-up-time 1 --measurement-time 2 ${BENCH_FILTER:-}) 2>&1 | tee "$OUT/cuda-bench.log"
bench_rc=${PIPESTATUS[0]}

echo "tests exit $tests_rc, benches exit $bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
