"""CPU timing of the C++ backend's gaussian_kl: forward (the KL sum) and forward+backward, min of many calls.

    python benchmarks/kl_timing.py                  # 640x640 softplus posterior, 1 thread, min of 200 calls

A quick check of the per-element KL formula's cost (csrc/posterior.h kl_term); NOTES.md "The KL's form" has the
figures.  The minimum, not the median, because one short call on a shared VM is mostly disturbed upward.
"""
from __future__ import annotations

import argparse
import time

import torch

import bnn_kernels as bk


def min_seconds(fn, calls: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640, help="the posterior is size x size (default 640)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per measurement (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if min(args.size, args.calls) < 1 or min(args.warmup, args.threads - 1) < 0:
        parser.error("--size, --calls and --threads must be positive, --warmup non-negative")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    shape = (args.size, args.size)
    mu = torch.randn(shape, generator=generator) * 0.1
    rho = torch.rand(shape, generator=generator) * 2 - 5
    prior = mu + 0.01 * torch.randn(shape, generator=generator)
    mu_leaf, rho_leaf = mu.clone().requires_grad_(), rho.clone().requires_grad_()

    def forward():
        bk.gaussian_kl(mu, rho, prior, 0.01, sigma_param="softplus")

    def forward_backward():
        bk.gaussian_kl(mu_leaf, rho_leaf, prior, 0.01, sigma_param="softplus").backward()

    with bk.use_backend("cpu"):
        for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            print(f"{name}: {min_seconds(fn, args.calls, args.warmup) * 1e3:.3f} ms", end="   ")
    print(f"({args.size}x{args.size}, {args.threads} thread(s), min of {args.calls} calls)")


if __name__ == "__main__":
    main()
