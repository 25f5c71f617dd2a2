"""What a user asks of a cache: the policy and its parameters, validated up front."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CacheConfigError


@dataclass(frozen=True)
class CacheConfig:
    """Cache policy and parameters.

    ``policy``: "full" keeps every key; "corm" evicts per CORM.md, where ``window`` and
    ``recent`` are its w and r. Policies ignore the parameters they do not use.

    ``prefill_chunk`` (off by default) feeds a long prompt in chunks of that many tokens,
    evicting after each, so the keys a prompt holds at once stay bounded. Decisions then
    differ from one-shot prefill: queries of later chunks attend only to the keys earlier
    chunks kept (their hidden states are no longer exact), and each chunk's eviction is
    judged by its own last ``window`` queries instead of only the prompt's last ones.
    """

    policy: str = "full"
    window: int = 256
    recent: int = 256
    block_size: int = 16  # slots per storage block: memory granularity per (row, layer, KV head)
    prefill_chunk: int | None = None  # split long prompts into chunks, evicting between them

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
        if self.prefill_chunk is not None and (isinstance(self.prefill_chunk, bool)
                                               or not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1):
            raise CacheConfigError(f"CacheConfig.prefill_chunk must be a positive integer or None, "
                                   f"got {self.prefill_chunk!r}")
        if self.block_size < 1:
            raise CacheConfigError(f"CacheConfig.block_size must be >= 1, got {self.block_size}")
        if self.recent < 0:
            raise CacheConfigError(f"CacheConfig.recent must be >= 0 (protected positions), got {self.recent}")
