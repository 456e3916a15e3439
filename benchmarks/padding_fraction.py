"""How much of a training epoch is padding: the recipe's batches of 32 from the
shuffled union of the emotion and sentiment train splits, each padded to its
longest tweet (token counts capped at 64, the recipe's max length).

    pip install tokenizers
    python benchmarks/padding_fraction.py --data ../shared/data/tweeteval \
        --tokenizer ~/.cache/sentence-mtl/models/sentence-transformers/all-MiniLM-L6-v2/tokenizer.json
"""

import argparse
import random

from tokenizers import Tokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    tok = Tokenizer.from_file(args.tokenizer)
    tok.no_padding()
    tok.no_truncation()
    texts = []
    for task in ["emotion", "sentiment"]:
        with open(f"{args.data}/{task}/train_text.txt", encoding="utf-8") as f:
            texts += f.read().splitlines()
    lengths = [min(len(e.ids), args.max_length) for e in tok.encode_batch(texts)]
    random.seed(args.seed)
    random.shuffle(lengths)
    real = rows = 0
    for i in range(0, len(lengths), args.batch_size):
        batch = lengths[i : i + args.batch_size]
        real += sum(batch)
        rows += max(batch) * len(batch)
    print(
        f"{len(lengths)} tweets, {real} real tokens in {rows} padded rows: "
        f"{1 - real / rows:.1%} padding, mean {real / len(lengths):.1f} tokens"
    )


if __name__ == "__main__":
    main()
