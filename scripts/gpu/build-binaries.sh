#!/usr/bin/env bash
# Builds, on a machine with no GPU, the CUDA test and bench binaries that
# scripts/gpu/run.sh runs on a GPU machine, and rehearses them up to their first
# CUDA call.
#
# - Release profile, `cuda` feature, for a portable CPU level: x86-64-v3 (AVX2,
#   FMA; no AVX-512), whatever CPU builds them (RUSTFLAGS replaces
#   .cargo/config.toml's target-cpu=native), and without the gemm crate's AVX-512
#   kernels (`--no-default-features`): the GPU host's CPU is unknown, and an
#   illegal instruction there would waste the device time. The script checks
#   that no AVX-512 instruction (a zmm register or an opmask) is in them,
#   outside functions that a crate picks at run time only where the CPU has
#   AVX-512 (crc32fast's, behind is_x86_feature_detected).
# - Linked against stub driver/cuBLAS/cuRAND/NVRTC libraries
#   (../shared/cuda/gen_stubs.py); the GPU machine loads the real ones.
# - Stripped and packed into gpu-bin/binaries.tar.gz (git-ignored; carry gpu-bin),
#   at most 64 MiB in all (checked).
# - Rehearsal: each binary starts here (on the stubs), lists its tests or
#   benches, and the GPU tests fail with "no CUDA device" under
#   SENTENCE_MTL_REQUIRE_GPU=1, as they must where no GPU is.
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
ln -sf "$CUDA_HOME/lib/libcudart.so.13" "$STUBS/libcudart.so.13"

# Stubs only at link time (build.rs adds them to the search path).
export SENTENCE_MTL_CUDA_STUBS=$STUBS
export RUSTFLAGS="-C target-cpu=x86-64-v3"
# A target folder of its own: other flags than the everyday build's.
export CARGO_TARGET_DIR=${SENTENCE_MTL_GPU_TARGET:-target/gpu-release}

list_executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
        print(msg["executable"])'
}

rm -rf gpu-bin && mkdir -p gpu-bin/bin
cargo test --release --no-default-features --features cuda --test gpu --bench cuda_ops \
  --no-run --message-format=json | list_executables | while read -r exe; do
  name=$(basename "$exe" | sed 's/-[0-9a-f]*$//')
  # Only the two targets asked for (the CLI binary is built for the tests too).
  case "$name" in gpu | cuda_ops) ;; *) continue ;; esac
  cp "$exe" "gpu-bin/bin/$name"
done
ls gpu-bin/bin/gpu gpu-bin/bin/cuda_ops >/dev/null

# The whole-model benches' data (the GPU machine has neither the model cache
# nor ../shared): the real tokenizer and every TweetEval tweet, for
# SENTENCE_MTL_BENCH_DATA in scripts/gpu/run.sh; and for PyTorch's side of the
# training step (benchmarks/train_torch.py --random-init), MiniLM's folder
# without its weights and the TweetEval folder.
mkdir -p gpu-bin/bin/data/minilm
scripts/fetch-model.sh >/dev/null
minilm=${SENTENCE_MTL_CACHE:-$HOME/.cache/sentence-mtl}/models/sentence-transformers/all-MiniLM-L6-v2
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
  cp "$minilm/$f" gpu-bin/bin/data/minilm/
done
cp gpu-bin/bin/data/minilm/tokenizer.json gpu-bin/bin/data/
cp -r ../shared/data/tweeteval gpu-bin/bin/data/tweeteval
cat ../shared/data/tweeteval/{emotion,sentiment}/{train,val,test}_text.txt >gpu-bin/bin/data/tweets.txt
wc -l gpu-bin/bin/data/tweets.txt

echo "== portable CPU level: no AVX-512 instruction (but where chosen at run time)"
# Functions that hold AVX-512 code but run only after a CPU feature check.
RUNTIME_DISPATCHED='^crc32fast::specialized::pclmulqdq::'
for exe in gpu-bin/bin/gpu gpu-bin/bin/cuda_ops; do
  report=$(objdump -d --no-show-raw-insn -C "$exe" | awk '
    /^[0-9a-f]+ <.*>:$/ { fn = substr($0, index($0, "<") + 1); sub(/>:$/, "", fn) }
    /%zmm|%k[1-7]/ { count[fn]++ }
    END { for (f in count) print count[f] "\t" f }')
  allowed=$(printf '%s\n' "$report" | awk -F'\t' -v re="$RUNTIME_DISPATCHED" 'NF == 2 && $2 ~ re { n += $1 } END { print n + 0 }')
  banned=$(printf '%s\n' "$report" | awk -F'\t' -v re="$RUNTIME_DISPATCHED" 'NF == 2 && $2 !~ re')
  [ -z "$banned" ] || { echo "error: $exe uses AVX-512 in:" >&2; echo "$banned" >&2; exit 1; }
  echo "$(basename "$exe"): no AVX-512 but $allowed instructions in run-time dispatched functions"
  strip "$exe"
done

echo "== rehearsal: the binaries start here and find no CUDA device"
export LD_LIBRARY_PATH=$STUBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
gpu-bin/bin/gpu --list | tail -n 3
gpu-bin/bin/cuda_ops --bench --list 2>&1 | tail -n 3
if SENTENCE_MTL_REQUIRE_GPU=1 gpu-bin/bin/gpu --test-threads=1 >gpu-bin/rehearsal.log 2>&1; then
  echo "error: the GPU tests passed without a GPU" >&2
  exit 1
fi
grep -m1 "no CUDA device could be opened" gpu-bin/rehearsal.log
echo "GPU tests fail as they must without a GPU ($(grep -c 'FAILED' gpu-bin/rehearsal.log) lines FAILED)"

tar -C gpu-bin -czf gpu-bin/binaries.tar.gz bin
rm -rf gpu-bin/bin
size=$(stat -c %s gpu-bin/binaries.tar.gz)
echo "gpu-bin/binaries.tar.gz: $((size / 1024 / 1024)) MiB"
[ "$size" -lt $((60 * 1024 * 1024)) ] || { echo "error: over the 64 MiB carry limit" >&2; exit 1; }
