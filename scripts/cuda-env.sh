# Source this (`. scripts/cuda-env.sh`) after scripts/install-cuda.sh: puts the
# PyPI CUDA 13.0 compiler on PATH and sets what candle's CUDA build needs.
SENTENCE_MTL_CUDA_PREFIX=${SENTENCE_MTL_CUDA_PREFIX:-$HOME/.cache/sentence-mtl/cuda-13.0}
export CUDA_HOME=$SENTENCE_MTL_CUDA_PREFIX/nvidia/cu13
export CUDA_PATH=$CUDA_HOME
export PATH=$CUDA_HOME/bin:$PATH
# candle-kernels otherwise asks nvidia-smi, which a GPU-less machine lacks; 90 = Hopper.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
