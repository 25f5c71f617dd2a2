"""A dense cache that keeps every token: the ``full`` policy.

Per layer, keys and values live in [B, Hkv, capacity, D] buffers with a [B, capacity]
position table (-1 = padding or unused). Capacity doubles when full, so appending a token
copies nothing but the token (amortised), and the model's calls never reallocate per step.
"""

from __future__ import annotations

import torch

from ..attention_ops import AttentionSpec, attend
from .base import CacheStats, KVCache

INITIAL_CAPACITY = 64


class DenseCache(KVCache):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.used = 0
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.key_positions = torch.empty(self.batch_size, 0, dtype=torch.long, device=self.device)

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity, INITIAL_CAPACITY)
        shape = (self.batch_size, self.num_kv_heads, capacity, self.head_dim)

        def grown(old: torch.Tensor | None) -> torch.Tensor:
            new = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if old is not None:
                new[:, :, : self.used] = old[:, :, : self.used]
            return new

        self.keys = [grown(self.keys[i] if self.keys else None) for i in range(self.num_layers)]
        self.values = [grown(self.values[i] if self.values else None) for i in range(self.num_layers)]
        positions = torch.full((self.batch_size, capacity), -1, dtype=torch.long, device=self.device)
        positions[:, : self.used] = self.key_positions[:, : self.used]
        self.key_positions = positions
        self.capacity = capacity

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        t = k.shape[2]
        if layer == 0:
            self._reserve(self.used + t)
            self.key_positions[:, self.used : self.used + t] = positions
            self.used += t
        start = self.used - t
        self.keys[layer][:, :, start : self.used] = k
        self.values[layer][:, :, start : self.used] = v
        end = self.used
        return attend(q, self.keys[layer][:, :, :end], self.values[layer][:, :, :end], spec,
                      q_pos=positions, k_pos=self.key_positions[:, :end])

    def positions(self, layer: int) -> list[list[torch.Tensor]]:
        held = self.key_positions[:, : self.used]
        return [[row[row >= 0]] * self.num_kv_heads for row in held]

    def stats(self) -> CacheStats:
        kept = [int(n) for n in (self.key_positions[:, : self.used] >= 0).sum(dim=1)]
        retained = [[[n] * self.num_kv_heads for n in kept] for _ in range(self.num_layers)]
        held = sum(t.untyped_storage().nbytes() for t in self.keys + self.values)
        return CacheStats(retained, held, self.bytes_full(), [int(n) for n in self.lengths])
