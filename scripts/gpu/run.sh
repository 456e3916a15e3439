#!/usr/bin/env bash
# Runs on a GPU machine, from the repo root, with gpu-bin/ (from
# scripts/gpu/build-binaries.sh) beside it: the GPU-vs-CPU kernel tests (none
# may skip: SENTENCE_MTL_REQUIRE_GPU=1 makes a missing device a failure), then
# the CUDA benches. Everything lands in $OUT (default /tmp/sentence-mtl-gpu):
# run.log (all of it), gpu-tests.log, cuda-bench.log, summary.json (device,
# test counts and failures, every bench median line) and, where the machine
# has PyTorch with CUDA, torch-train-step.jsonl (benchmarks/train_torch.py).
# Sized to finish within 8 minutes: TEST_TIMEOUT (default 150 s), BENCH_TIMEOUT
# (default 210 s) and TORCH_TIMEOUT (default 90 s, twice) cap the steps.
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
SENTENCE_MTL_REQUIRE_GPU=1 timeout "${TEST_TIMEOUT:-150}" "$BIN/bin/gpu" --test-threads=1 2>&1 \
  | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== CUDA benches"
(cd "$BIN" && SENTENCE_MTL_BENCH_DATA="$BIN/bin/data" \
  timeout "${BENCH_TIMEOUT:-210}" "$BIN/bin/cuda_ops" --bench --noplot \
  --warm-up-time 1 --measurement-time 2 ${BENCH_FILTER:-}) 2>&1 | tee "$OUT/cuda-bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== PyTorch's training step (eager; random weights; the same batches and recipe)"
if python3 -c 'import torch, transformers; assert torch.cuda.is_available()' 2>/dev/null; then
  for precision in --bf16 ""; do
    timeout "${TORCH_TIMEOUT:-90}" python3 benchmarks/train_torch.py --data "$BIN/bin/data/tweeteval" \
      --model "$BIN/bin/data/minilm" --random-init --device cuda $precision --max-steps 60 \
      | tee -a "$OUT/torch-train-step.jsonl"
  done
else
  echo "no PyTorch with CUDA on this machine: the training step's PyTorch side not run"
fi

echo "tests exit $tests_rc, benches exit $bench_rc"
python3 - "$OUT" "$tests_rc" "$bench_rc" <<'EOF' || echo "no python3: summary.json not written"
import json, re, subprocess, sys
out, tests_rc, bench_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tests = open(f"{out}/gpu-tests.log", errors="replace").read()
bench = open(f"{out}/cuda-bench.log", errors="replace").read()
def bench_times(text):
    """(benchmark, "low median high") from criterion's `time: [..]` lines, whose
    name stands on the same line or, when long, on the line before."""
    times, name = [], None
    for line in text.splitlines():
        m = re.match(r"^(\S.*?)?\s*time:\s+\[(.*?)\]", line)
        if m:
            times.append([m.group(1) or name, m.group(2)])
        elif line and not line[0].isspace():
            name = line.strip()
    return times

result = re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed", tests)
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
except OSError:
    gpu = "unknown"
summary = {
    "device": gpu,
    "tests_exit": tests_rc,
    "tests_passed": sum(int(p) for p, _ in result),
    "tests_failed": sum(int(f) for _, f in result),
    "failed": re.findall(r"^test (\S+) \.\.\. FAILED", tests, re.M),
    "skipped_lines": [l for l in tests.splitlines() if "skipped" in l],
    "bench_exit": bench_rc,
    "bench_medians": [l for l in bench.splitlines() if "median" in l],
    "bench_times": bench_times(bench),
}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps({k: summary[k] for k in ("device", "tests_passed", "tests_failed", "failed")}))
EOF
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
