"""Attention arithmetic shared by the model (no cache) and every cache implementation.

Masks are derived from *positions*, never from tensor indices: a key at position ``p`` is
visible to a query at position ``t`` iff ``0 <= p <= t`` (and ``t - p < window`` under a
sliding window). Position ``-1`` marks padding or an empty slot. This is what lets a
ragged cache compact or reorder its storage freely: ALiBi biases and windows follow the
key's original position, not its slot.

GQA/MQA never materialise repeated keys and values in our code: SDPA's ``enable_gqa``
serves shared masks, and per-head masks fold the queries of a group into the sequence
dimension (``[B, Hkv, G*T, D]``) so SDPA sees one key/value head per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import prompt_attention
from .alibi import alibi_bias


@dataclass(frozen=True)
class AttentionSpec:
    """How one layer's attention turns positions into masks and biases."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None
    # ALiBi slopes [Hq]: see alibi_bias for the exact bias.
    alibi_slopes: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (float64 stays float64: exactness checks run in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def visibility_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [B, Hk, T, S]: which keys each query may attend to.

    ``q_pos`` is [B, T]; ``k_pos`` is [B, S] (shared by all heads) or [B, Hk, S] (per KV
    head, as in a ragged cache). Rows with no visible key (padding queries) are opened to
    every key so that softmax stays finite; their outputs are never used.
    """
    if k_pos.dim() == 2:
        k_pos = k_pos[:, None]
    q = q_pos[:, None, :, None]
    k = k_pos[:, :, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= (q - k) < window
    return mask | ~mask.any(dim=-1, keepdim=True)


def _group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, T, D] -> [B, Hkv, G*T, D]; query head h belongs to KV head h // G."""
    b, hq, t, d = q.shape
    return q.reshape(b, num_kv_heads, (hq // num_kv_heads) * t, d)


def _ungroup(out: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, hkv, gt, d = out.shape
    return out.reshape(b, num_heads, gt * hkv // num_heads, d)


def _group_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """[B, Hk, T, S] -> [B, Hk, G*T, S] matching :func:`_group_queries`."""
    if group == 1:
        return mask
    b, hk, t, s = mask.shape
    return mask[:, :, None].expand(b, hk, group, t, s).reshape(b, hk, group * t, s)


def key_alibi_bias(spec: AttentionSpec, k_pos: torch.Tensor) -> torch.Tensor:
    """Float32 [B, Hq, 1, S] ALiBi bias of each key (``k_pos`` [B, S] or [B, Hkv, S])."""
    if k_pos.dim() == 2:
        k_pos = k_pos[:, None]
    if k_pos.shape[1] != 1:
        k_pos = k_pos[:, torch.arange(spec.num_heads, device=k_pos.device) // spec.group_size]
    return alibi_bias(spec.alibi_slopes.to(k_pos.device)[None, :, None], k_pos, spec.scale)[:, :, None, :]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """SDPA over ``k``/``v`` [B, Hkv, S, D] for queries ``q`` [B, Hq, T, D] -> [B, Hq, T, D].

    With ``causal=True`` and no positions (a whole unpadded sequence), SDPA's causal kernel
    runs with no mask tensor at all. A mask shared by all KV heads (``k_pos`` [B, S]) is
    broadcast; per-head masks (``k_pos`` [B, Hkv, S], a ragged cache) fold each query
    group into the sequence dimension so that nothing is repeated per query head.
    """
    group = spec.group_size
    gqa = group > 1
    if causal and q_pos is None:
        if spec.sliding_window is None and spec.alibi_slopes is None:
            return prompt_attention.causal(q, k, v, spec.scale, False, lambda: (F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=spec.scale, enable_gqa=gqa), None))[0]
        q_pos = k_pos = torch.arange(q.shape[2], device=q.device).expand(q.shape[0], -1)
    if q_pos is None or k_pos is None:
        raise ValueError("attend needs q_pos and k_pos unless causal=True on an unpadded sequence")
    mask = visibility_mask(q_pos, k_pos, spec.sliding_window)
    if spec.alibi_slopes is not None:
        bias = key_alibi_bias(spec, k_pos)
        hq_mask = mask if mask.shape[1] == 1 else mask.repeat_interleave(group, dim=1)
        bias = bias.masked_fill(~hq_mask, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=spec.scale, enable_gqa=gqa)
    if mask.shape[1] == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale, enable_gqa=gqa)
    out = F.scaled_dot_product_attention(
        _group_queries(q, spec.num_kv_heads), k, v, attn_mask=_group_mask(mask, group), scale=spec.scale
    )
    return _ungroup(out, spec.num_heads)


# SDPA's CPU flash kernel as an op of its own: the same output as F.scaled_dot_product_attention
# (which runs it on CPU), plus each query's log-sum-exp, which it computes anyway
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_lse_broken = False  # set once the op refused a call: never offered again


def attend_causal_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``attend(q, k, v, spec, causal=True)`` and, where the path that runs it computes it (a
    plain causal prompt on CPU: cormlm's prompt kernel, or SDPA's flash kernel in float32 or
    bfloat16), each query's log-sum-exp of its scaled scores [B, Hq, T] (float32) as a
    by-product: a policy's log-probabilities of a few rows are then their scores minus it,
    with no softmax over them. None where it is not."""
    plain = spec.sliding_window is None and spec.alibi_slopes is None and q.shape[2] == k.shape[2]
    if not plain:
        return attend(q, k, v, spec, causal=True), None
    return prompt_attention.causal(q, k, v, spec.scale, True, lambda: sdpa_causal_with_lse(q, k, v, spec))


def sdpa_causal_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch's plain causal attention (no window, no ALiBi) and each query's log-sum-exp where
    its CPU flash kernel gives it (None where not)."""
    global _flash_lse_broken
    if _FLASH_CPU is not None and not _flash_lse_broken and q.device.type == "cpu" \
            and q.dtype in (torch.float32, torch.bfloat16):
        try:
            out, lse = _FLASH_CPU(q, k, v, is_causal=True, scale=spec.scale)
            return out, lse
        except RuntimeError:  # a torch whose kernel refuses this call (e.g. no native GQA): SDPA as always
            _flash_lse_broken = True
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=spec.scale,
                                          enable_gqa=spec.group_size > 1), None


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
