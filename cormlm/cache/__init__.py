"""KV caches: storage, policies and the one interface models use."""

from .base import CacheStats, KVCache
from .config import CacheConfig
from .registry import available_policies, build_cache, make_cache

__all__ = ["CacheConfig", "CacheStats", "KVCache", "available_policies", "build_cache", "make_cache"]
