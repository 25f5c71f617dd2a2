"""StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks plus a recent window.

Keeps the first ``sink`` positions and the most recent ones; needs no scores. The window
is ``recent`` tokens, or whatever a ``budget`` (tokens or fraction) leaves after the sinks.
"""

from __future__ import annotations

import torch

from .budget import budget_tokens
from .config import STREAMING_SINK
from .policy import EvictionPolicy, SlotView


class StreamingPolicy(EvictionPolicy):
    name = "streaming"
    parameters = ("sink", "recent", "budget")
    defaults = {"sink": STREAMING_SINK}

    def __init__(self, sink: int, recent: int | None, budget: int | float | None) -> None:
        self.sink = sink
        self.recent = recent
        self.budget = budget

    def evict(self, view: SlotView) -> torch.Tensor:
        t = view.query_t
        window = (budget_tokens(self.budget, t) - self.sink).clamp(min=0) if self.recent is None else self.recent
        pos = view.positions
        return (pos >= self.sink) & (pos < t - window)
