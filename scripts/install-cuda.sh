#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler (nvcc, NVVM, headers, cudart) from PyPI's NVIDIA
# wheels into a cache outside the repo. Idempotent. Then: `. scripts/cuda-env.sh`.
# Pinned 13.0.x with --no-deps: newer 13.x parts write PTX that the 580.x driver on
# the lent GPU machines may refuse.
set -euo pipefail
PREFIX=${SENTENCE_MTL_CUDA_PREFIX:-$HOME/.cache/sentence-mtl/cuda-13.0}
if [ -x "$PREFIX/nvidia/cu13/bin/nvcc" ]; then
  echo "nvcc already installed in $PREFIX" >&2
  exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$PREFIX" \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
"$PREFIX/nvidia/cu13/bin/nvcc" --version | tail -n 2 >&2
