"""The noise stream as a Triton kernel: element i gets tl.randn(seed, offset + i), with int64 counters."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import FP_FUSION, INTERPRET, launching_on


@triton.jit
def _philox_normal_kernel(seed_ptr, out_ptr, offset, numel, BLOCK: tl.constexpr):
    seed = tl.load(seed_ptr)
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + index, tl.randn(seed, index + offset), mask=index < numel)


_BLOCK = 1024


def philox_normal(seed: torch.Tensor, numel: int, offset: int, device) -> torch.Tensor:
    """Float32 normals number ``offset .. offset + numel - 1`` of stream ``seed`` (1-D)."""
    device = torch.device(device) if device is not None else seed.device
    out = torch.empty(int(numel), dtype=torch.float32, device=device)
    if numel > 0:
        seed = seed.to(device=device, dtype=torch.int64).contiguous()
        with launching_on(device):
            _philox_normal_kernel[(triton.cdiv(int(numel), _BLOCK),)](
                seed, out, int(offset), int(numel), BLOCK=_BLOCK, num_warps=4 if INTERPRET else 8, **FP_FUSION)
    return out
