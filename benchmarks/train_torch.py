#!/usr/bin/env python3
"""PyTorch side of the multi-task quality and speed comparison.

The same recipe as `sentence-mtl train`'s defaults: all-MiniLM-L6-v2 + masked
mean pooling + two linear heads (emotion, sentiment); mixed batches of 32 from
the shuffled union of both training sets, the other head's label ignored
(-100); padding to the longest in the batch, max length 64; AdamW (betas
0.9/0.999, eps 1e-8), backbone lr 5e-5, heads lr 1e-3, weight decay 0.01 on
every parameter; 6% linear warmup (ceil) then linear decay; no gradient
clipping; 3 epochs; seed 42; the model's own dropout. After each epoch:
validation accuracy / macro-F1 / macro-recall per task; after the last: test.

Prints per-epoch lines on stderr and one JSON line of final metrics and timings
on stdout (the same keys as `sentence-mtl train`'s line where they overlap).

    pip install torch transformers
    python benchmarks/train_torch.py --data ../shared/data/tweeteval --threads 2
    python benchmarks/train_torch.py --data ../shared/data/tweeteval --max-steps 20   # speed only

On a GPU, the side of issue 13's training-step target (PyTorch eager, bf16
autocast; random weights from the model folder's config.json where the weights
are not there, as on the GPU machine; a step's time does not depend on them):

    python benchmarks/train_torch.py --data DIR --device cuda --bf16 --random-init --max-steps 60

On CUDA every step ends with a synchronisation (as `sentence-mtl train` reads
its losses back each step) and the JSON line adds `median_step_seconds` over
the steps after the first five (warm-up: cuBLAS handles, allocator).
"""

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, get_linear_schedule_with_warmup

IGNORE_INDEX = -100
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def default_model():
    """The folder scripts/fetch-model.sh fills, else the hub id."""
    root = os.environ.get("SENTENCE_MTL_CACHE", os.path.expanduser("~/.cache/sentence-mtl"))
    local = os.path.join(root, "models", DEFAULT_MODEL)
    return local if os.path.isfile(os.path.join(local, "config.json")) else DEFAULT_MODEL


def read_lines(path):
    """Lines of a file: LF or CRLF, with or without a final newline."""
    with open(path, encoding="utf-8", newline="") as f:
        content = f.read()
    if content.endswith("\n"):
        content = content[:-1]
    return [line[:-1] if line.endswith("\r") else line for line in content.split("\n")]


def load_task(data, task, split):
    texts = read_lines(os.path.join(data, task, f"{split}_text.txt"))
    labels = [int(x) for x in read_lines(os.path.join(data, task, f"{split}_labels.txt"))]
    assert len(texts) == len(labels), f"{task}/{split}: {len(texts)} texts, {len(labels)} labels"
    return texts, labels


def load_mapping(data, task):
    return [line.split("\t", 1)[1].strip() for line in read_lines(os.path.join(data, task, "mapping.txt"))]


class MultiTaskModel(nn.Module):
    def __init__(self, name, num_a, num_b, random_init=False):
        super().__init__()
        if random_init:
            self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(name))
        else:
            self.encoder = AutoModel.from_pretrained(name)
        hidden = self.encoder.config.hidden_size
        self.head_a = nn.Linear(hidden, num_a)
        self.head_b = nn.Linear(hidden, num_b)

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.head_a(pooled), self.head_b(pooled)


def head_loss(logits, labels):
    """Mean cross-entropy over the rows labelled for this head; 0 without any."""
    if (labels != IGNORE_INDEX).any():
        return nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    return logits.sum() * 0.0


def metrics(labels, predictions, num_classes):
    """Accuracy, macro-F1, macro-recall as scikit-learn defines them (classes
    present in labels or predictions; 0 for a zero denominator)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    f1s, recalls = [], []
    for c in range(num_classes):
        tp = int(((labels == c) & (predictions == c)).sum())
        true, pred = int((labels == c).sum()), int((predictions == c).sum())
        if true + pred == 0:
            continue
        recalls.append(tp / true if true else 0.0)
        f1s.append(2 * tp / (true + pred))
    return {
        "accuracy": float((labels == predictions).mean()),
        "macro_f1": float(np.mean(f1s)),
        "macro_recall": float(np.mean(recalls)),
        "count": int(len(labels)),
    }


def encode(tokenizer, texts, max_len, device="cpu"):
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def autocast(args):
    """bf16 autocast on CUDA with --bf16 (matmuls in bf16, reductions and
    losses in f32: PyTorch's mixed precision), else nothing."""
    return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16)


@torch.no_grad()
def evaluate(model, tokenizer, texts, labels, head, num_classes, args):
    model.eval()
    predictions = []
    for i in range(0, len(texts), args.eval_batch_size):
        enc = encode(tokenizer, texts[i : i + args.eval_batch_size], args.max_len, args.device)
        with autocast(args):
            logits = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])[head]
        predictions.extend(logits.argmax(-1).tolist())
    model.train()
    return metrics(labels, predictions, num_classes)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the TweetEval folder (emotion/, sentiment/)")
    p.add_argument("--model", default=default_model())
    p.add_argument("--tasks", nargs=2, default=["emotion", "sentiment"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--backbone-lr", type=float, default=5e-5)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--freeze-backbone", action="store_true", help="train the heads only")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (speed only)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--random-init", action="store_true", help="random weights from the folder's config.json")
    args = p.parse_args()
    if args.bf16 and args.device == "cpu":
        p.error("--bf16 needs --device cuda")

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    names = [load_mapping(args.data, t) for t in args.tasks]
    train = [load_task(args.data, t, "train") for t in args.tasks]
    val = [load_task(args.data, t, "val") for t in args.tasks]
    test = [load_task(args.data, t, "test") for t in args.tasks]
    # The union: (text, head, label) for both tasks.
    union = [(text, h, label) for h in (0, 1) for text, label in zip(*train[h])]

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = MultiTaskModel(args.model, len(names[0]), len(names[1]), args.random_init).to(args.device)
    model.train()
    on_cuda = args.device.startswith("cuda")
    heads = list(model.head_a.parameters()) + list(model.head_b.parameters())
    groups = [{"params": heads, "lr": args.head_lr}]
    if args.freeze_backbone:
        for param in model.encoder.parameters():
            param.requires_grad_(False)
    else:
        groups.insert(0, {"params": list(model.encoder.parameters()), "lr": args.backbone_lr})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(union) / args.batch_size)
    total = steps_per_epoch * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total), total)
    generator = torch.Generator().manual_seed(args.seed)

    step, train_seconds, stopped, val_metrics, step_seconds = 0, 0.0, False, None, []
    for epoch in range(args.epochs):
        order = torch.randperm(len(union), generator=generator).tolist()
        started = time.perf_counter()
        steps_this_epoch = 0
        for i in range(0, len(order), args.batch_size):
            if args.max_steps is not None and step >= args.max_steps:
                stopped = True
                break
            step_started = time.perf_counter()
            rows = [union[j] for j in order[i : i + args.batch_size]]
            enc = encode(tokenizer, [r[0] for r in rows], args.max_len, args.device)
            labels = torch.full((len(rows), 2), IGNORE_INDEX, dtype=torch.long)
            for k, (_, h, label) in enumerate(rows):
                labels[k, h] = label
            labels = labels.to(args.device)
            with autocast(args):
                logits_a, logits_b = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
            # The losses in f32, as autocast leaves them.
            loss = head_loss(logits_a.float(), labels[:, 0]) + head_loss(logits_b.float(), labels[:, 1])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if on_cuda:
                torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - step_started)
            step += 1
            steps_this_epoch += 1
        seconds = time.perf_counter() - started
        train_seconds += seconds
        if stopped:
            break
        val_metrics = {
            args.tasks[h]: evaluate(model, tokenizer, *val[h], h, len(names[h]), args) for h in (0, 1)
        }
        described = " | ".join(
            f"{t} acc {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} macro-recall {m['macro_recall']:.4f}"
            for t, m in val_metrics.items()
        )
        print(
            f"epoch {epoch + 1}/{args.epochs} ({steps_this_epoch} steps, {seconds:.1f}s, "
            f"{seconds / max(steps_this_epoch, 1):.3f}s/step): val {described}",
            file=sys.stderr,
        )

    test_metrics = None
    if not stopped:
        test_metrics = {
            args.tasks[h]: evaluate(model, tokenizer, *test[h], h, len(names[h]), args) for h in (0, 1)
        }
    print(
        json.dumps(
            {
                "framework": f"torch {torch.__version__}",
                "threads": args.threads,
                "tasks": args.tasks,
                "steps": step,
                "epochs_completed": epoch + (0 if stopped else 1),
                "stopped_early": stopped,
                "train_seconds": train_seconds,
                "seconds_per_step": train_seconds / max(step, 1),
                "median_step_seconds": float(np.median(step_seconds[5:])) if len(step_seconds) > 5 else None,
                "device": torch.cuda.get_device_name() if on_cuda else "cpu",
                "bf16": args.bf16,
                "val": val_metrics,
                "test": test_metrics,
            }
        )
    )


if __name__ == "__main__":
    main()
