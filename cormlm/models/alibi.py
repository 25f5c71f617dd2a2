"""ALiBi (Press et al.) as Falcon-RW's published implementation computes it: slopes and biases,
rounding included. Every attention path (SDPA masks, explicit scores, the paged decode
step) takes its bias from :func:`alibi_bias`."""

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


def alibi_bias(slopes: torch.Tensor, key_positions: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * bf16(bf16(slope) * bf16(key position))`` in float32, ``slopes`` broadcast against
    ``key_positions`` (empty slots, position -1, count as 0). It uses the key's absolute
    position only: the query's share of ``slope * (key - query)`` is the same for every key
    of a row, and softmax ignores it."""
    product = slopes.to(torch.bfloat16) * key_positions.clamp(min=0).to(torch.bfloat16)
    return product.float() * scale
