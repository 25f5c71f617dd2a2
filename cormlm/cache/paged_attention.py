"""Decode-step attention straight over the block pool, with no gather of keys or values.

Each block is scored against the queries of the stream that owns it (one bmm over all
blocks); the softmax is a segmented one over each stream's blocks (scatter max, exp,
index_add). The normalised probabilities fall out of the same computation, so a policy
that needs them (CORM) costs no second pass: they are the ones the output is made from.
``decode_layer_step`` adds the policy's state update; a compiled model runs it inside its
one-graph decode step (``cormlm.compile_model``), an eager one updates all layers at once
after the step (``decode_layer_observation`` gives what the update reads).

Eagerly, on CPU, the same computation also exists as one fused C kernel
(:mod:`cormlm.cache.paged_kernel`), which reads each key and value once; each pool shape
takes whichever of the two measures faster where it runs. A compiled decode step, which
cannot time anything, calls that kernel as one opaque operation wherever it is built (see
:func:`cormlm.cache.paged_kernel.choose_for_graphs`), else inductor fuses the tensor operations.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..models.alibi import alibi_bias
from ..models.attention_ops import AttentionSpec, upcast
from . import paged_kernel
from .paged import stream_live_counts
from .policy import EvictionPolicy, group_max

if TYPE_CHECKING:
    from .ragged import QueryGroup

DENSE_SEGMENTS_MAX = 2**22  # streams x blocks up to which the compiled CPU step avoids scatters


def _dense_segments(owner: torch.Tensor, num_streams: int) -> bool:
    """Whether per-stream reductions go through a [streams x blocks] membership matrix.

    Only inside a compiled CPU graph (CUDA atomics are fast) and only while that matrix is
    small: it costs streams times the work of a scatter.
    """
    return (torch.compiler.is_compiling() and owner.device.type == "cpu"
            and num_streams * owner.shape[0] <= DENSE_SEGMENTS_MAX)


def _segment_max(x: torch.Tensor, owner: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Per-stream max of block scores ``x`` [NB, G, block] -> [S, G].

    Eager: one scatter of the whole blocks, then a max over the few [S, G, block] rows (a
    max over each block first is the slower reduction). Compiled on CPU: a masked max over
    a [S, NB, G] view, since inductor turns scatters into atomic updates that contend on a
    2-core CPU (3-4x slower than eager); see :func:`_dense_segments` for when.
    """
    if _dense_segments(owner, num_streams):
        member = owner[None, :, None] == torch.arange(num_streams, device=owner.device)[:, None, None]
        return torch.where(member, x.amax(dim=-1)[None], float("-inf")).amax(dim=1)
    index = owner[:, None, None].expand_as(x)
    return torch.full((num_streams, *x.shape[1:]), float("-inf"), dtype=x.dtype, device=x.device).scatter_reduce(
        0, index, x, reduce="amax", include_self=True).amax(dim=-1)


def _segment_sum(x: torch.Tensor, owner: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Per-stream sum of block rows ``x`` [NB, ...] -> [S, ...]: eager index_add, compiled on
    CPU a one-hot GEMM (no atomics; see :func:`_segment_max`)."""
    if _dense_segments(owner, num_streams):
        one_hot = (owner[None, :] == torch.arange(num_streams, device=owner.device)[:, None]).to(x.dtype)
        return (one_hot @ x.reshape(x.shape[0], -1)).view(num_streams, *x.shape[1:])
    return torch.zeros(num_streams, *x.shape[1:], dtype=x.dtype, device=x.device).index_add_(0, owner, x)


def paged_decode_attention(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                           owner: torch.Tensor, q: torch.Tensor, q_pos: torch.Tensor,
                           spec: AttentionSpec, probs: str | None = "heads",
                           probs_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query per stream over a block pool (``keys`` [NB, D, block] and ``values``
    [NB, block, D] as the pool stores them, ``positions`` [NB, block], ``owner`` [NB], -1 =
    free): ``q`` [S, G, D], ``q_pos`` [S] -> output [S, G, D] and the probabilities ``probs``
    names: each query's ("heads": [NB, G, block]), the group's max or sum ("max" / "sum":
    [NB, 1, block]), or none (None). The fused kernel writes them into ``probs_out`` when given
    (a contiguous tensor of as many elements); check whether they landed there."""
    if probs not in paged_kernel.PROBS_MODES:  # never a silent fall-back to another form
        raise ValueError(f"probs must be one of {list(paged_kernel.PROBS_MODES)}, got {probs!r}")
    fits = paged_kernel.fits(keys, values, positions, owner, q, spec.alibi_slopes is not None)
    if torch.compiler.is_compiling():
        if fits and paged_kernel.graph_path == "native":
            return paged_kernel.graph_run(keys, values, positions, owner, q, q_pos, spec.scale, spec.sliding_window,
                                          probs)
        return tensor_decode_attention(keys, values, positions, owner, q, q_pos, spec, probs)
    # the fused kernel or the tensor operations, whichever measured faster for this shape
    if fits:
        key = paged_kernel.shape_key(keys, q, probs)
        path, trial = paged_kernel.choose(key)
        started = time.perf_counter() if trial else 0.0
        if path == "native":
            result = paged_kernel.run(keys, values, positions, owner, q, q_pos, spec.scale, spec.sliding_window, probs,
                                      probs_out, key)
        else:
            result = tensor_decode_attention(keys, values, positions, owner, q, q_pos, spec, probs)
        if trial:
            paged_kernel.record(key, path, time.perf_counter() - started)
        return result
    return tensor_decode_attention(keys, values, positions, owner, q, q_pos, spec, probs)


def tensor_decode_attention(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                            owner: torch.Tensor, q: torch.Tensor, q_pos: torch.Tensor,
                            spec: AttentionSpec, probs: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`paged_decode_attention` in tensor operations (what a compiled graph fuses)."""
    s, g, d = q.shape
    owner = owner.clamp(min=0)
    block_q = q[owner]  # [NB, G, D]: a few rows per block, not a copy of the cache
    # [NB, G, bs]; the scale applied inside the product (GEMM's alpha: no pass of its own)
    scores = upcast(torch.baddbmm(block_q.new_empty(1, 1, 1), block_q, keys, beta=0, alpha=spec.scale))
    pos = positions
    # Every stored key precedes the query (it was appended first) and free or empty slots
    # hold position -1, so "not stored" is the whole causal mask.
    hidden = pos < 0
    if spec.sliding_window is not None:
        hidden |= (q_pos[owner][:, None] - pos) >= spec.sliding_window
    if spec.alibi_slopes is not None:
        slopes = spec.alibi_slopes.view(-1, g).repeat(s // (spec.alibi_slopes.numel() // g), 1)  # [S, G]
        scores = scores + alibi_bias(slopes[owner][:, :, None], pos[:, None, :], spec.scale)
    # in place from here on: ``scores`` is this call's own (fewer allocations, same bits)
    scores.masked_fill_(hidden[:, None, :], float("-inf"))
    peak = _segment_max(scores, owner, s)  # [S, G]
    weights = scores.sub_(peak[owner][:, :, None]).exp_()  # invisible slots: exp(-inf) = 0
    denom = _segment_sum(weights.sum(dim=-1), owner, s)
    partial = torch.bmm(weights.to(values.dtype), values)  # [NB, G, D]
    out = _segment_sum(upcast(partial), owner, s).div_(denom[:, :, None])
    if probs is None:
        return out.to(q.dtype), None
    per_head = weights.div_(denom[owner][:, :, None])
    if probs == "max":
        return out.to(q.dtype), group_max(per_head, dim=1)
    return out.to(q.dtype), per_head.sum(dim=1, keepdim=True) if probs == "sum" else per_head


def decode_layer_observation(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                             owner: torch.Tensor, q: torch.Tensor, q_pos: torch.Tensor, stream_t: torch.Tensor,
                             spec: AttentionSpec, policy: EvictionPolicy, query_group: QueryGroup | None = None,
                             probs_out: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One layer's decode attention and what the policy reads of it: output [S, G, D], the
    probabilities as ``decode_update`` takes them ([NB, G, 1, block], the group reduced to 1
    when the policy declares ``group_reduce``; None when the policy reads none) and the keys
    each stream attended to ([NB, 1]; None unless the policy asks).

    ``query_group`` (tensor parallelism, a replicated KV head) completes the group's
    probabilities from the other ranks before the policy reads them. ``probs_out``: where the
    probabilities may be written (see :func:`paged_decode_attention`).
    """
    # the group reduced as the policy reads it (exact: see EvictionPolicy.group_reduce)
    wanted = (policy.group_reduce or "heads") if policy.needs_probs else None
    out, probs = paged_decode_attention(keys, values, positions, owner, q, q_pos, spec, wanted, probs_out)
    if probs is None:
        return out, None, None
    attended = None
    if policy.needs_attended:  # keys each stream attended to (its own included): [NB, 1]
        attended = stream_live_counts(positions, owner, stream_t.shape[0])[owner.clamp(min=0)][:, None]
    grouped = probs[:, :, None, :]  # [NB, G or 1, 1, block]: the group at -3, as observe() expects
    if query_group is not None:
        grouped = query_group.combine(grouped, policy.group_reduce)
    return out, grouped, attended


def decode_layer_step(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, owner: torch.Tensor,
                      state: dict[str, torch.Tensor], q: torch.Tensor, q_pos: torch.Tensor,
                      block_t: torch.Tensor | None, stream_t: torch.Tensor, spec: AttentionSpec,
                      policy: EvictionPolicy, query_group: QueryGroup | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One layer's decode attention and the policy's state update: output [S, G, D], new state.

    Tensors in, tensors out (no host syncs, no storage changes), so that ``torch.compile``
    can fuse it whole; ``block_t`` [NB, 1] is the owning stream's 1-indexed query position (None
    when the policy reads no probabilities). An eager step instead keeps each layer's
    observation and updates every layer's state at once (``RaggedCache.end_step``).
    """
    out, grouped, attended = decode_layer_observation(keys, values, positions, owner, q, q_pos, stream_t, spec,
                                                      policy, query_group)
    if grouped is None:
        return out, state
    return out, policy.decode_update(state, grouped, block_t, attended)
