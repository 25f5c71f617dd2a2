"""ALiBi slopes (Press et al.), as Falcon-RW's published implementation computes them."""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """Per-head slopes: a geometric sequence for the largest power of two <= num_heads, then
    every other slope of the next power's sequence. Rounded to bfloat16 like the reference
    implementation, so biases match it bit for bit."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base**p for p in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base**p for p in range(1, 1 + 2 * min(closest, num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32, device=device).bfloat16().float()
