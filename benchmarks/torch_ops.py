"""PyTorch's side of the CPU op benchmarks (`cargo bench --bench ops`): the same
computations at the same sizes, f32, so that the two can be run side by side.

    pip install torch
    python benchmarks/torch_ops.py --threads 2

Prints the median time of each, in microseconds.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def median_us(fn, min_seconds=2.0, warmup=20):
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 50:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def mean_pool(hidden, mask):
    # sentence-transformers' mean pooling.
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}

    for b, t, h in [(32, 128, 384), (64, 128, 768)]:
        hidden = torch.randn(b, t, h)
        # As benches/ops/mean_pool.rs: every token real.
        mask = torch.ones(b, t, dtype=torch.long)
        results[f"mean pool forward [{b},{t},{h}]"] = median_us(lambda: mean_pool(hidden, mask))
        hv = hidden.clone().requires_grad_(True)

        def pool_fwd_bwd():
            hv.grad = None
            mean_pool(hv, mask).sum().backward()

        results[f"mean pool fwd+bwd [{b},{t},{h}]"] = median_us(pool_fwd_bwd)

    a, b = torch.randn(4096, 384), torch.randn(4096, 384)
    results["cosine row-wise forward [4096,384]"] = median_us(lambda: F.cosine_similarity(a, b, dim=1))
    results["l2_normalize forward [4096,384]"] = median_us(lambda: F.normalize(a, dim=1))
    a1, b1 = torch.randn(1024, 384), torch.randn(1024, 384)
    results["cosine matrix forward [1024,384]x[1024,384]"] = median_us(
        lambda: F.normalize(a1, dim=1) @ F.normalize(b1, dim=1).T
    )

    n = 4096
    la, lb = torch.randn(n, 4), torch.randn(n, 3)
    ya = torch.randint(0, 4, (n,))
    yb = torch.randint(0, 3, (n,))
    # As benches/ops/cross_entropy.rs: each row belongs to one head at random,
    # the other head's label ignored.
    head_a = torch.rand(n) < 0.5
    ya[~head_a] = -100
    yb[head_a] = -100
    results["dual CE forward [4096,4]+[4096,3]"] = median_us(
        lambda: (F.cross_entropy(la, ya), F.cross_entropy(lb, yb))
    )
    la_g, lb_g = la.clone().requires_grad_(True), lb.clone().requires_grad_(True)

    def ce_fwd_bwd():
        la_g.grad = None
        lb_g.grad = None
        (F.cross_entropy(la_g, ya) + F.cross_entropy(lb_g, yb)).backward()

    results["dual CE fwd+bwd [4096,4]+[4096,3]"] = median_us(ce_fwd_bwd)

    print(f"torch {torch.__version__}, {args.threads} threads, medians:")
    for name, us in results.items():
        print(f"  {name}: {us:.1f} us")


if __name__ == "__main__":
    main()
