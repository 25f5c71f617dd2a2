"""The narrow waist between models and caches.

A model hands each attention layer's new keys/values and its queries to
``cache.attend(layer, q, k, v, positions, spec)`` and gets the attention output back.
That one call lets a cache store tokens however it likes (dense, paged, ragged per head)
and lets its policy look at the queries it needs to score keys, without the model knowing.
Positions, not storage slots, define what a query may see (see ``attention_ops``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..config import kv_bytes_per_token
from ..models.attention_ops import AttentionSpec


@dataclass(frozen=True)
class CacheStats:
    """Memory the cache holds against what a full cache would hold for the same tokens."""

    retained_tokens: list[list[list[int]]]  # [layer][batch row][kv head]
    bytes_held: int  # measured from the storage of the cache's tensors
    bytes_full: int  # keys + values a full cache would store for every token seen
    tokens_seen: list[int]  # per batch row, padding excluded

    @property
    def compression_ratio(self) -> float:
        """Full-cache bytes over held bytes (2.0 = half the memory)."""
        return self.bytes_full / self.bytes_held if self.bytes_held else float("inf")

    @property
    def retained_fraction(self) -> float:
        kept = sum(n for layer in self.retained_tokens for row in layer for n in row)
        heads = sum(len(row) for row in self.retained_tokens[0]) if self.retained_tokens else 0
        total = len(self.retained_tokens) * sum(self.tokens_seen) * (heads // max(len(self.tokens_seen), 1))
        return kept / total if total else 1.0

    def as_dict(self) -> dict:
        return {
            "retained_tokens": self.retained_tokens,
            "bytes_held": self.bytes_held,
            "bytes_full": self.bytes_full,
            "tokens_seen": self.tokens_seen,
            "compression_ratio": self.compression_ratio,
            "retained_fraction": self.retained_fraction,
        }


class KVCache(ABC):
    """Per-layer key/value storage for one batch, plus the policy that evicts from it."""

    def __init__(self, batch_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.batch_size = batch_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.max_length = 0  # host copy of lengths.max(): checks without device syncs
        self.prefill_chunk: int | None = None  # generate() feeds longer prompts in chunks of this
        self.kv_bytes_per_token = kv_bytes_per_token(num_layers, num_kv_heads, head_dim, self.dtype.itemsize)

    def begin_step(self, valid: torch.Tensor | None, num_tokens: int) -> tuple[torch.Tensor, int]:
        """Assign absolute positions to the step's new tokens; padding gets -1.

        Returns the positions [B, T] and the largest one as a host int.
        """
        offsets = self.lengths[:, None]
        if valid is None:
            positions = offsets + torch.arange(num_tokens, device=self.device)
            self.lengths = self.lengths + num_tokens
            self.max_length += num_tokens
        else:
            positions = (offsets + valid.long().cumsum(dim=1) - 1).masked_fill(~valid, -1)
            self.lengths = self.lengths + valid.sum(dim=1)
            self.max_length = int(self.lengths.max())
        return positions, self.max_length - 1

    def end_step(self) -> None:
        """Called by the model after its last layer (bookkeeping, compaction)."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, spec: AttentionSpec, out_rows: int | None = None) -> torch.Tensor:
        """Store the new ``k``/``v`` [B, Hkv, T, D] and attend ``q`` [B, Hq, T, D] over the layer.
        ``out_rows``: only the last that many query rows' outputs are wanted ([B, Hq, out_rows, D];
        the cache still stores every key and its policy still sees every row it scores)."""

    @abstractmethod
    def positions(self, layer: int) -> list[list[torch.Tensor]]:
        """Per batch row, per KV head: the 0-indexed positions the layer still holds."""

    @abstractmethod
    def storage_tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (keys, values and bookkeeping): what stats() measures."""

    @abstractmethod
    def stats(self) -> CacheStats:
        """Retained tokens, bytes held (real storage) and bytes a full cache would hold."""

    def bytes_full(self) -> int:
        return int(self.lengths.sum()) * self.kv_bytes_per_token
