"""The one attention module every family uses.

Its only state is the cache object it is handed per call; families differ in the
projections' biases, the position encoding (RoPE or ALiBi) and the KV head count, all
read from :class:`ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import ModelConfig
from .attention_ops import AttentionSpec, attend, default_scale
from .linear import Linear
from .rope import apply_rotary

if TYPE_CHECKING:
    from ..cache.base import KVCache


@dataclass
class StepContext:
    """What every layer of one forward call shares: positions, rotary tables and cache."""

    positions: torch.Tensor  # [B, T] absolute 0-indexed positions, -1 for padding
    rotary: tuple[torch.Tensor, torch.Tensor] | None  # (cos, signed sin) [B, T, 1, rotary_dim]
    cache: KVCache | None
    plain_causal: bool  # one unpadded sequence, no cache: SDPA's causal kernel suffices


class Attention(nn.Module):
    """One layer's attention in three calls, ``project`` -> ``attend`` -> ``output``, so the
    dense ends can be compiled around the cache call (see ``cormlm.compile``)."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        self.qkv = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.attention_out_bias)
        # ALiBi slopes [Hq] (set by the model): a buffer, so that model.to() moves them too
        self.register_buffer("alibi_slopes", None, persistent=False)
        self._spec = AttentionSpec(
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            scale=default_scale(config.head_dim),
            sliding_window=config.sliding_window,
        )

    @property
    def spec(self) -> AttentionSpec:
        """How this layer's attention turns positions into masks and biases (current slopes)."""
        if self._spec.alibi_slopes is not self.alibi_slopes:
            self._spec = dataclasses.replace(self._spec, alibi_slopes=self.alibi_slopes)
        return self._spec

    def project(self, h: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [B, Hq, T, D] and keys/values [B, Hkv, T, D], rotated when the model uses RoPE
        (queries and keys of every head in one rotation)."""
        return self.heads(self.qkv(h), rotary)

    def heads(self, qkv: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection ``qkv`` [B, T, Hq * D + 2 * Hkv * D] as queries, keys and values
        (views), queries and keys rotated by ``rotary`` when given."""
        b, t, _ = qkv.shape
        q_size, kv_size, _ = self.split_sizes
        heads = self.num_heads + self.num_kv_heads
        qk = qkv[..., :q_size + kv_size].view(b, t, heads, self.head_dim)
        if rotary is not None:
            qk = apply_rotary(qk, *rotary)
        v = qkv[..., q_size + kv_size:].view(b, t, self.num_kv_heads, self.head_dim)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepContext,
               out_rows: int | None = None) -> torch.Tensor:
        """Attention output [B, Hq, T, D], through the cache when there is one; ``out_rows``:
        only the last that many query rows' outputs ([B, Hq, out_rows, D])."""
        if step.cache is not None:
            return step.cache.attend(self.layer_index, q, k, v, step.positions, self.spec, out_rows)
        if out_rows is not None:
            return attend(q[:, :, -out_rows:], k, v, self.spec, step.positions[:, -out_rows:], step.positions)
        if step.plain_causal:
            return attend(q, k, v, self.spec, causal=True)
        return attend(q, k, v, self.spec, q_pos=step.positions, k_pos=step.positions)

    def output(self, out: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The output projection; ``bias=False`` leaves its bias out (see ``Linear.forward``)."""
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim), bias)
