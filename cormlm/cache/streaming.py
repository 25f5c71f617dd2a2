"""StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks plus a recent window.

Keeps the first ``sink`` positions and the most recent ones; needs no scores. The window
is ``recent`` tokens, or whatever a ``budget`` (tokens or fraction) leaves after the sinks.
"""

from __future__ import annotations

import torch

from ..errors import CacheConfigError
from .budget import budget_tokens
from .policy import EvictionPolicy, SlotView


class StreamingPolicy(EvictionPolicy):
    name = "streaming"
    parameters = ("sink", "recent", "budget")
    defaults = {"sink": 4}
    help = {"sink": "first positions always kept (4)", "recent": "the recent window kept after the sinks",
            "budget": "keys kept in all, sinks included: tokens (int) or fraction (float)"}

    @classmethod
    def check(cls, given: dict) -> None:
        if (given["budget"] is None) == (given["recent"] is None):
            raise CacheConfigError("policy 'streaming' keeps the sinks plus a recent window: give exactly one of "
                                   "{budget} (tokens in all) or {recent} (window length)", "budget", "recent")

    def __init__(self, sink: int, recent: int | None, budget: int | float | None) -> None:
        self.sink = sink
        self.recent = recent
        self.budget = budget

    def evict(self, view: SlotView) -> torch.Tensor:
        t = view.query_t
        window = (budget_tokens(self.budget, t) - self.sink).clamp(min=0) if self.recent is None else self.recent
        pos = view.positions
        return (pos >= self.sink) & (pos < t - window)
