#!/usr/bin/env bash
# Builds, on a machine with no GPU, the CUDA test and bench binaries that
# scripts/gpu/run.sh runs on a GPU machine: release, `cuda` feature, linked
# against stub driver/cuBLAS/cuRAND/NVRTC libraries (../shared/cuda/gen_stubs.py),
# stripped and packed into gpu-bin/binaries.tar.gz (git-ignored; carry it).
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/install-cuda.sh
. scripts/cuda-env.sh

STUBS=${SENTENCE_MTL_CUDA_STUBS:-$HOME/.cache/sentence-mtl/cuda-stubs}
if [ ! -e "$STUBS/libcuda.so" ]; then
  cudarc_src=$(cargo metadata --format-version 1 --features cuda | python3 -c '
import json, os, sys
pkgs = json.load(sys.stdin)["packages"]
print(next(os.path.dirname(p["manifest_path"]) for p in pkgs if p["name"] == "cudarc") + "/src")')
  mkdir -p "$STUBS"
  python3 ../shared/cuda/gen_stubs.py "$cudarc_src" "$STUBS"
fi
ln -sf "$CUDA_HOME/lib/libcudart.so.13" "$STUBS/libcudart.so"

# Stubs only at link time (build.rs adds them to the search path); on the GPU
# machine the real driver and libraries load. The test profile keeps every
# dependency at opt-level 3 and shares the build of `cargo check --features cuda`
# (candle's CUDA kernels take long to build); the kernels are nvcc -O3 either way.
export SENTENCE_MTL_CUDA_STUBS=$STUBS

list_executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
        print(msg["executable"])'
}

rm -rf gpu-bin && mkdir -p gpu-bin/bin
{
  cargo test --features cuda --test gpu --bench cuda_ops --no-run --message-format=json
} | list_executables | while read -r exe; do
  name=$(basename "$exe" | sed 's/-[0-9a-f]*$//')
  cp "$exe" "gpu-bin/bin/$name"
  strip "gpu-bin/bin/$name"
done
tar -C gpu-bin -czf gpu-bin/binaries.tar.gz bin
rm -rf gpu-bin/bin
ls -l gpu-bin
