"""What a user asks of a cache: the policy and its parameters, validated up front."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CacheConfigError


@dataclass(frozen=True)
class CacheConfig:
    """Cache policy and parameters.

    ``policy``: "full" keeps every key. ``window`` and ``recent`` are CORM's w and r
    (see CORM.md); policies ignore the parameters they do not use.
    """

    policy: str = "full"
    window: int = 256
    recent: int = 256
    block_size: int = 16  # slots per storage block: memory granularity per (row, layer, KV head)

    def __post_init__(self) -> None:
        from .registry import available_policies

        if self.policy not in available_policies():
            raise CacheConfigError(
                f"unknown cache policy '{self.policy}'; available policies: {', '.join(available_policies())}"
            )
        for name in ("window", "recent", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise CacheConfigError(f"CacheConfig.{name} must be an integer, got {value!r}")
        if self.window < 1:
            raise CacheConfigError(f"CacheConfig.window must be >= 1 (queries remembered), got {self.window}")
        if self.block_size < 1:
            raise CacheConfigError(f"CacheConfig.block_size must be >= 1, got {self.block_size}")
        if self.recent < 0:
            raise CacheConfigError(f"CacheConfig.recent must be >= 0 (protected positions), got {self.recent}")
