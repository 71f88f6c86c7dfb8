"""`make demo` for the kernel core: what runs here, that every backend draws the same sample, and what it saves.

    python -m bnn_kernels.demo

The few-shot fine-tuning study that will become the main demo is not part of the kernel core yet.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import bayes_linear, backends, use_backend
from .reference import bayes_linear_materialised
from .registry import select
from .sigma import gaussian_kl_terms, sigma_from_rho


def _saved_bytes(fn, *inputs) -> int:
    """Bytes autograd keeps for backward beyond the inputs themselves."""
    pointers = {t.untyped_storage().data_ptr() for t in inputs}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in pointers:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def _paper_style(x, mu, rho):
    sigma = sigma_from_rho(rho, "softplus")
    weight = mu + sigma * torch.randn_like(mu)
    return F.linear(x, weight), gaussian_kl_terms(mu, sigma, None, 0.01).sum()


def _step_seconds(fn, repeats=5) -> float:
    times = []
    for _ in range(repeats + 1):
        begin = time.perf_counter()
        y, kl = fn()
        (y.sum() + kl).backward()
        times.append(time.perf_counter() - begin)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"bnn_kernels demo on {device}: usable backends {backends()}, default for {device.type}: {select(device)}")

    # 1. one seed, one weight sample, whichever backend draws it
    x = torch.randn(16, 64, device=device)
    mu = torch.randn(48, 64, device=device) / 8
    rho = torch.full((48, 64), -4.0, device=device)
    oracle, _ = bayes_linear_materialised(x.double(), mu.double(), rho.double(), None, torch.tensor(7))
    print("\n1. Same seed on every backend (max |y - float64 oracle|):")
    for name in backends():
        with use_backend(name):
            y, kl = bayes_linear(x, mu, rho, seed=7)
        print(f"   {name:>9}: {(y.double().cpu() - oracle.cpu()).abs().max().item():.2e}   kl = {kl.item():.2f}")

    # 2. what autograd keeps for backward at a UNet feed-forward shape (64 tokens, 1280 -> 5120)
    x = torch.randn(64, 1280, device=device, requires_grad=True)
    mu = (torch.randn(5120, 1280, device=device) / 36).requires_grad_()
    rho = torch.full((5120, 1280), -4.6, device=device, requires_grad=True)
    paper = _saved_bytes(lambda: _paper_style(x, mu, rho), x, mu, rho)
    fused = {est: _saved_bytes(lambda: bayes_linear(x, mu, rho, seed=1, estimator=est), x, mu, rho)
             for est in ("reparam", "lrt")}
    print("\n2. Bytes saved for backward beyond the inputs, 64 tokens x (1280 -> 5120):")
    print(f"   paper-style (materialised eps and W): {paper / 2**20:8.2f} MiB")
    for est, nbytes in fused.items():
        print(f"   fused {est:<8}                      : {nbytes / 2**20:8.4f} MiB")

    # 3. one training step of that layer on this machine
    if device.type == "cpu" and "cpu" not in backends():
        print("\n3. (timing skipped: the C++ extension is not built)")
    else:
        print(f"\n3. Forward+backward of that layer on {device.type}, median of 5 (backend {select(device)}):")
        for label, fn in (("F.linear", lambda: (F.linear(x, mu), mu.sum() * 0)),
                          ("paper-style", lambda: _paper_style(x, mu, rho)),
                          ("fused reparam", lambda: bayes_linear(x, mu, rho, seed=1)),
                          ("fused lrt", lambda: bayes_linear(x, mu, rho, seed=1, estimator="lrt"))):
            print(f"   {label:>13}: {1e3 * _step_seconds(fn):8.1f} ms")
    print("\nThe few-shot fine-tuning study (the corruption stage and its mitigation) is not built yet;")
    print("this demo covers the kernel core: noise stream, fused Bayesian linear op, KL.")


if __name__ == "__main__":
    main()
