"""The policy interface: what a baseline must implement to rule the ragged cache.

A policy never sees storage layout. It turns attention probabilities into per-key
observations (``observe``), folds them into per-slot state (``merge``) and says which slots
to drop (``evict``). The cache calls ``observe`` on whatever layout it has at hand
(prefill: dense [B, Hkv, G, Q, S]; decode: pool blocks [NB, G, 1, block]), always with the
query-group dimension at -3, the query dimension at -2 and keys last.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class SlotView:
    """One layer's pool as a policy sees it at eviction time (all [NB, block] unless noted)."""

    positions: torch.Tensor  # 0-indexed positions, -1 = empty slot
    state: dict[str, torch.Tensor]  # the policy's per-slot state
    query_t: torch.Tensor  # [NB, 1]: 1-indexed position of the owning stream's latest query
    owner: torch.Tensor  # [NB]: stream (row * Hkv + head) owning each block, -1 = free


class EvictionPolicy(ABC):
    """Base policy: keeps everything. Subclasses override what they need."""

    name: ClassVar[str] = "full"
    needs_probs: ClassVar[bool] = False

    def state_fields(self) -> dict[str, tuple[torch.dtype, float]]:
        """Per-slot state: name -> (dtype, value of a freshly stored key)."""
        return {}

    def query_rows(self, num_queries: int) -> int:
        """How many of a multi-token call's last queries the policy must score."""
        return 0

    def observe(self, probs: torch.Tensor, query_t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reduce probabilities [..., G, Q, S] (query_t [..., Q], 0 = padding) to per-key [..., S]."""
        return {}

    def merge(self, state: dict[str, torch.Tensor], observed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New values of the observed slots' state (same shapes as ``observed``)."""
        return {}

    def evict(self, view: SlotView) -> torch.Tensor | None:
        """Bool [NB, block]: slots to drop now (None = nothing)."""
        return None
