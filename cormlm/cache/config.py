"""What a user asks of a cache: the policy and its parameters, validated up front."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CacheConfigError

POLICY_FIELDS = ("window", "recent", "budget", "sink", "threshold", "magnitude")  # fields only some policies read


@dataclass(frozen=True)
class CacheConfig:
    """Cache policy and parameters.

    - ``full``: keeps every key.
    - ``corm``: docs/corm.md; ``window`` and ``recent`` are its w and r (default 256 each).
      With a ``budget`` (bounded CORM), a stream still over it after CORM's rule drops the
      keys whose last importance is oldest, the ``recent`` ones protected. ``threshold``
      and ``magnitude`` are options beyond the rule (docs/corm.md, "Options beyond the rule").
    - ``streaming``: the first ``sink`` positions plus the most recent ones: ``recent``
      tokens, or ``budget`` in all (sinks included).
    - ``h2o``, ``scissorhands``, ``knorm``: a fixed ``budget`` per KV head; the last
      ``recent`` positions are protected (default: half the budget). Scissorhands counts
      unimportance over its last ``window`` queries (default 32, at most 64).

    ``budget`` is a number of tokens (int) or a fraction of the tokens seen so far
    (float in (0, 1]), per batch row, layer and KV head. A parameter the policy does not
    read is an error (``CacheConfig("corm", budget=512)`` would otherwise do nothing).

    ``prefill_chunk`` (off by default): ``generate`` feeds a long prompt in chunks of that many tokens,
    evicting after each, so the keys a prompt holds at once stay bounded. Decisions then
    differ from one-shot prefill: queries of later chunks attend only to the keys earlier
    chunks kept (their hidden states are no longer exact), and each chunk's eviction is
    judged by its own last queries instead of only the prompt's last ones.
    """

    policy: str = "full"
    window: int | None = None
    recent: int | None = None
    budget: int | float | None = None
    sink: int | None = None  # streaming only; None: 4
    threshold: float | None = None  # corm only: alpha in a >= alpha / t; None: 1
    magnitude: float | None = None  # corm only: m, strong marks remembered longer; None: the rule
    block_size: int | None = None  # slots per storage block (memory granularity per row, layer, KV head); see below
    prefill_chunk: int | None = None  # split long prompts into chunks, evicting between them

    def __post_init__(self) -> None:
        from .registry import available_policies, policy_class

        if self.policy not in available_policies():
            raise CacheConfigError(
                f"unknown cache policy '{self.policy}'; available policies: {', '.join(available_policies())}"
            )
        cls = policy_class(self.policy)
        ignored = [name for name in POLICY_FIELDS if getattr(self, name) is not None and name not in cls.parameters]
        if ignored:
            uses = ", ".join(f"{{{name}}}" for name in cls.parameters) or "none of " + ", ".join(POLICY_FIELDS)
            raise CacheConfigError(f"policy '{self.policy}' does not use {{{ignored[0]}}}; it takes {uses}",
                                   ignored[0], *cls.parameters)
        for name, low, meaning in (("window", 1, "queries remembered"), ("recent", 0, "protected positions"),
                                   ("sink", 0, "first positions kept"), ("block_size", 1, "slots per block"),
                                   ("prefill_chunk", 1, "tokens per prefill chunk")):
            value = getattr(self, name)
            if value is None and name in ("window", "recent", "sink", "block_size", "prefill_chunk"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise CacheConfigError(f"{{{name}}} must be an integer, got {value!r}", name)
            if value < low:
                raise CacheConfigError(f"{{{name}}} must be >= {low} ({meaning}), got {value}", name)
        self._check_budget()
        cls.check({name: getattr(self, name) for name in cls.parameters})

    def slots_per_block(self, sliding_window: int | None = None) -> int:
        """``block_size``, or when unset the default for this policy on a model with this
        ``sliding_window``: 64 for a cache that never evicts (fewer, larger blocks make decode
        attention cheaper and cost only the tail block's spare slots), 16 for one that does
        (a hole stays held until its whole block empties or the pool compacts, so smaller
        blocks keep held bytes near retained ones)."""
        if self.block_size is not None:
            return self.block_size
        from .registry import policy_class

        evicts = policy_class(self.policy).can_evict() or sliding_window is not None
        return 16 if evicts else 64

    def _check_budget(self) -> None:
        budget = self.budget
        if budget is None:
            return
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise CacheConfigError(f"{{budget}} must be a number of tokens (int) or a fraction (float), "
                                   f"got {budget!r}", "budget")
        if isinstance(budget, int) and budget < 1:
            raise CacheConfigError(f"{{budget}} must be >= 1 token, got {budget}", "budget")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise CacheConfigError(f"{{budget}} as a fraction must be in (0, 1], got {budget}", "budget")
