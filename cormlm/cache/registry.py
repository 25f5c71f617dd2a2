"""Which cache implementation serves which policy, and how to build one for a model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .base import KVCache
from .dense import DenseCache

if TYPE_CHECKING:
    from .config import CacheConfig

CacheFactory = Callable[..., KVCache]

_POLICIES: dict[str, CacheFactory] = {"full": lambda cfg, **kw: DenseCache(**kw)}


def available_policies() -> list[str]:
    return list(_POLICIES)


def build_cache(cfg: "CacheConfig", *, batch_size: int, num_layers: int, num_kv_heads: int,
                head_dim: int, dtype, device) -> KVCache:
    return _POLICIES[cfg.policy](cfg, batch_size=batch_size, num_layers=num_layers,
                                 num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, device=device)
