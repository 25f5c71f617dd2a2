"""CORM (Dai et al., arXiv 2404.15949) exactly as docs/corm.md defines it.

The paper's w x n message matrix is kept as one integer per key, ``last_important``: the
last (1-indexed) step at which any query head of the group gave the key at least the
uniform share 1/t of its attention (0 = never). A key is long-term minor at step t iff
t >= w and last_important <= t - w, which is exactly "unimportant to each of the last w
queries", in O(n) memory whatever w is.

With a ``budget`` (tokens or a fraction, as for the budget policies) CORM's decisions are
kept and memory is bounded whatever the text: a stream still over its budget drops the keys
whose ``last_important`` is oldest first, the recent ones protected (what a server needs to
admit requests). ``threshold`` (alpha) scales the importance test to a >= alpha/t. With
neither option set, ``policy="corm"`` is exactly docs/corm.md.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import CacheConfigError
from .budget import check_recent_within_budget, drop_over_budget
from .policy import EvictionPolicy, SlotView

DEFAULT_WINDOW_AND_RECENT = 256


class CormPolicy(EvictionPolicy):
    name = "corm"
    parameters = ("window", "recent", "budget", "threshold")
    defaults = {"window": DEFAULT_WINDOW_AND_RECENT, "recent": DEFAULT_WINDOW_AND_RECENT, "threshold": 1.0}
    help = {"window": f"w, the queries whose opinion of a key is remembered ({DEFAULT_WINDOW_AND_RECENT})",
            "recent": f"r, the newest positions never evicted ({DEFAULT_WINDOW_AND_RECENT})",
            "budget": "optional bound per KV head (tokens or fraction): drops the keys important longest ago",
            "threshold": "alpha: a key is important to query t iff it gets >= alpha/t of its attention (1.0)"}

    @classmethod
    def check(cls, given: dict) -> None:
        alpha = given["threshold"]
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1):
            raise CacheConfigError(f"{{threshold}} must be a number in (0, 1] (the share of 1/t that makes a key "
                                   f"important), got {alpha!r}", "threshold")
        recent = cls.defaults["recent"] if given["recent"] is None else given["recent"]
        check_recent_within_budget(cls.name, given["budget"], recent, given["recent"] is None)
    needs_probs = True

    def __init__(self, window: int, recent: int, budget: int | float | None = None, threshold: float = 1.0) -> None:
        self.window = window
        self.recent = recent
        self.budget = budget  # optional memory bound: see evict
        self.threshold = threshold  # alpha of the importance test a >= alpha / t (docs/corm.md: 1)

    def state_fields(self) -> dict[str, tuple[torch.dtype, float]]:
        return {"last_important": (torch.int32, 0)}

    def query_rows(self, num_queries: int) -> int:
        return min(self.window, num_queries)

    def observe(self, probs: torch.Tensor, query_t: torch.Tensor, attended: torch.Tensor | None,
                visible: torch.Tensor | None) -> dict[str, torch.Tensor]:
        threshold = self.threshold / query_t.float()  # padding queries: t = 0 -> inf, never important
        important = (probs >= threshold[..., None, :, None]).any(dim=-3)  # union over the group
        marked = torch.where(important, query_t[..., :, None].to(torch.int32), 0)
        return {"last_important": marked.amax(dim=-2)}

    def merge(self, state: dict[str, torch.Tensor], observed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"last_important": torch.maximum(state["last_important"], observed["last_important"])}

    def evict(self, view: SlotView) -> torch.Tensor:
        t = view.query_t
        # empty slots hold position -1 and are dropped again harmlessly
        minor = view.state["last_important"] <= t - self.window  # t < w: t - w < 0 <= any mark
        old_enough = view.positions <= t - (self.recent + 1)
        drop = minor & old_enough
        if self.budget is None:
            return drop
        # Bounded CORM: of what the rule keeps, a stream over its budget drops the keys whose
        # last importance is oldest (never marked first; the older key among equals), the
        # recent ones protected.
        kept = dataclasses.replace(view, positions=view.positions.masked_fill(drop, -1))
        return drop | drop_over_budget(kept, -view.state["last_important"], self.budget, self.recent)
