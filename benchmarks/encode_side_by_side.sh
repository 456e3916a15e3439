#!/usr/bin/env bash
# Encoding throughput, ours and sentence-transformers', interleaved (two rounds
# each) so that both see the same machine state. Both use 2 threads, batch 32,
# the 50 reference sentences x 20, f32. Run on a quiet machine.
#   PYTHON=/path/to/venv/bin/python benchmarks/encode_side_by_side.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
cargo bench --bench encode --no-run
for round in 1 2; do
    echo "== round $round: sentence-mtl"
    RAYON_NUM_THREADS=2 cargo bench --bench encode -- --noplot 2>&1 | grep -E "encode|time:|thrpt:"
    echo "== round $round: sentence-transformers"
    "$PY" benchmarks/st_encode.py --threads 2 --runs 5
done
