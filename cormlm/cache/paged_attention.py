"""Decode-step attention straight over the block pool, with no gather of keys or values.

Each block is scored against the queries of the stream that owns it (one bmm over all
blocks); the softmax is a segmented one over each stream's blocks (scatter max, exp,
index_add). The normalised probabilities fall out of the same computation, so a policy
that needs them (CORM) costs no second pass: they are the ones the output is made from.
"""

from __future__ import annotations

import torch

from ..attention_ops import AttentionSpec
from .paged import BlockPool


def paged_decode_attention(pool: BlockPool, q: torch.Tensor, q_pos: torch.Tensor,
                           spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per stream: ``q`` [S, G, D], ``q_pos`` [S] -> output [S, G, D], probs [NB, G, block]."""
    s, g, d = q.shape
    owner = pool.owner.clamp(min=0)
    block_q = q[owner]  # [NB, G, D]: a few rows per block, not a copy of the cache
    scores = torch.bmm(block_q, pool.keys.transpose(1, 2)).float() * spec.scale  # [NB, G, bs]
    pos = pool.positions
    # Every stored key precedes the query (it was appended first) and free or empty slots
    # hold position -1, so "stored" is the whole causal mask.
    visible = pos >= 0
    if spec.sliding_window is not None:
        visible &= (q_pos[owner][:, None] - pos) < spec.sliding_window
    if spec.alibi_slopes is not None:  # the same bias as attention_ops.alibi_bias, per block
        slopes = spec.alibi_slopes.view(-1, g).repeat(s // (spec.alibi_slopes.numel() // g), 1)
        block_slopes = slopes[owner].to(torch.bfloat16)[:, :, None]
        scores = scores + (block_slopes * pos.clamp(min=0).to(torch.bfloat16)[:, None, :]).float() * spec.scale
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    index = owner[:, None].expand(-1, g)
    peak = torch.full((s, g), float("-inf"), device=q.device).scatter_reduce(
        0, index, scores.amax(dim=-1), reduce="amax", include_self=True)
    weights = torch.exp(scores - peak[owner][:, :, None])  # invisible slots: exp(-inf) = 0
    denom = torch.zeros(s, g, device=q.device).index_add_(0, owner, weights.sum(dim=-1))
    partial = torch.bmm(weights.to(pool.values.dtype), pool.values)  # [NB, G, D]
    out = torch.zeros(s, g, d, device=q.device).index_add_(0, owner, partial.float())
    out = out / denom[:, :, None]
    probs = weights / denom[owner][:, :, None]
    return out.to(q.dtype), probs
