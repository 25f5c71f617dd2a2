"""CORM (Dai et al., arXiv 2404.15949) exactly as docs/corm.md defines it.

The paper's w x n message matrix is kept as one number per key, ``keep_until``: the last
(1-indexed) step at which any query head of the group gave the key at least the uniform
share 1/t of its attention, plus w (never marked: w). A key is long-term minor at step t
iff keep_until <= t, which is exactly "t >= w and unimportant to each of the last w
queries", in O(n) memory whatever w is.

With a ``budget`` (tokens or a fraction, as for the budget policies) CORM's decisions are
kept and memory is bounded whatever the text: a stream still over its budget drops the keys
whose memory ends first (the oldest last mark), the recent ones protected (what a server needs to
admit requests). ``threshold`` (alpha) scales the importance test to a >= alpha/t.
``magnitude`` (m) remembers a strong mark longer: a query t that gives a key k times the
share alpha/t marks it for w * (1 + m * log2 k) queries instead of w, and every prompt
query counts, not only the last w (a key the prompt's middle leaned on survives its end).
With no option set, ``policy="corm"`` is exactly docs/corm.md.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import CacheConfigError
from . import corm_step
from .budget import check_recent_within_budget, drop_over_budget
from .policy import EvictionPolicy, SlotView, group_max, group_max_

DEFAULT_WINDOW_AND_RECENT = 256


class CormPolicy(EvictionPolicy):
    name = "corm"
    parameters = ("window", "recent", "budget", "threshold", "magnitude")
    defaults = {"window": DEFAULT_WINDOW_AND_RECENT, "recent": DEFAULT_WINDOW_AND_RECENT, "threshold": 1.0}
    help = {"window": f"w, the queries whose opinion of a key is remembered ({DEFAULT_WINDOW_AND_RECENT})",
            "recent": f"r, the newest positions never evicted ({DEFAULT_WINDOW_AND_RECENT})",
            "budget": "optional bound per KV head (tokens or fraction): drops the keys important longest ago",
            "threshold": "alpha: a key is important to query t iff it gets >= alpha/t of its attention (1.0)",
            "magnitude": "m: a mark of k times alpha/t lasts w*(1 + m*log2 k) queries; all prompt queries count"}

    needs_probs = True
    group_reduce = "max"  # observe reads the group through its max (the union of threshold tests)

    @classmethod
    def check(cls, given: dict) -> None:
        alpha = given["threshold"]
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1):
            raise CacheConfigError(f"{{threshold}} must be a number in (0, 1] (the share of 1/t that makes a key "
                                   f"important), got {alpha!r}", "threshold")
        magnitude = given["magnitude"]
        if magnitude is not None and (isinstance(magnitude, bool) or not isinstance(magnitude, (int, float))
                                      or not 0 <= magnitude <= 16):
            raise CacheConfigError(f"{{magnitude}} must be a number in [0, 16] (how much longer a strong mark is "
                                   f"remembered), got {magnitude!r}", "magnitude")
        recent = cls.defaults["recent"] if given["recent"] is None else given["recent"]
        check_recent_within_budget(cls.name, given["budget"], recent, given["recent"] is None)

    def __init__(self, window: int, recent: int, budget: int | float | None = None, threshold: float = 1.0,
                 magnitude: float | None = None) -> None:
        self.window = window
        self.recent = recent
        self.budget = budget  # optional memory bound: see evict
        self.threshold = threshold  # alpha of the importance test a >= alpha / t (docs/corm.md: 1)
        self.magnitude = magnitude  # m: a mark of k * alpha / t lasts w * (1 + m log2 k) queries

    def state_fields(self) -> dict[str, tuple[torch.dtype, float]]:
        # float32: steps are exact integers up to 2**24, lifetimes with magnitude fractional
        return {"keep_until": (torch.float32, float(self.window))}

    def query_rows(self, num_queries: int) -> int:
        # a query older than the last w marks for longer than w only with magnitude
        return num_queries if self.magnitude else min(self.window, num_queries)

    def observe(self, probs: torch.Tensor, query_t: torch.Tensor, attended: torch.Tensor | None,
                visible: torch.Tensor | None) -> dict[str, torch.Tensor]:
        t = query_t.float()[..., :, None]  # [..., Q, 1]
        threshold = self.threshold / t  # padding queries: t = 0 -> inf, never important
        strongest = group_max(probs).squeeze(-3)  # union over the group: a >= x for some head iff max >= x
        # k: how many times alpha/t (only read by magnitude)
        log2_share = torch.log2((strongest / threshold).clamp(min=1.0)) if self.magnitude else None
        return self._marks(t, strongest >= threshold, log2_share)

    def observe_log(self, log_probs: torch.Tensor, query_t: torch.Tensor, attended: torch.Tensor | None,
                    visible: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """observe's test in logarithms: ln a - ln(alpha/t) >= 0, over the scratch in place."""
        t = query_t.float()[..., :, None]
        # ln k of the strongest head (padding queries: t = 0, ln(alpha/t) = inf, never important)
        ln_share = group_max_(log_probs).squeeze(-3).sub_(math.log(self.threshold) - torch.log(t))
        log2_share = ln_share.clamp(min=0.0) / math.log(2.0) if self.magnitude else None
        return self._marks(t, ln_share.ge_(0.0), log2_share)  # 1.0 where important, over the scratch

    def _marks(self, t: torch.Tensor, important: torch.Tensor, log2_share: torch.Tensor | None
               ) -> dict[str, torch.Tensor]:
        """keep_until from each query's important keys [..., Q, S]: the latest t + lifetime.
        ``important``: booleans, or 1.0 / 0.0 in a float tensor that the marks overwrite (a
        product in place runs several times faster than where() into the scratch)."""
        lifetime = float(self.window) if log2_share is None else self.window * (1.0 + self.magnitude * log2_share)
        marks = t + lifetime
        if important.dtype == torch.bool:
            until = torch.where(important, marks, marks.new_zeros(()))
        else:
            until = important.mul_(marks)
        return {"keep_until": until.amax(dim=-2)}

    def merge(self, state: dict[str, torch.Tensor], observed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"keep_until": torch.maximum(state["keep_until"], observed["keep_until"])}

    def decode_update(self, state: dict[str, torch.Tensor], probs: torch.Tensor, query_t: torch.Tensor,
                      attended: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One query per stream: a key it marks gets t + w, which is past every mark it held
        (those came from earlier queries, or are the fresh w), so where() replaces observe's
        amax and merge's maximum (magnitude's lifetimes vary: the general path)."""
        if self.magnitude:
            return super().decode_update(state, probs, query_t, attended)
        t = query_t.float()  # [NB, 1]
        important = group_max(probs)[:, 0, 0] >= self.threshold / t  # [NB, block]
        return {"keep_until": torch.where(important, t + float(self.window), state["keep_until"])}

    def native_decode_step(self, state: dict[str, torch.Tensor], probs: torch.Tensor, positions: torch.Tensor,
                           query_t: torch.Tensor, layer_of_row: torch.Tensor, layers: int,
                           window: int | None) -> list[int] | None:
        """The rule without options (no budget, no magnitude) as one C pass (``corm_step.c``)."""
        keep_until = state["keep_until"]
        if self.budget is not None or self.magnitude or not corm_step.fits(keep_until, positions, probs, query_t):
            return None
        return corm_step.decode_step(keep_until, positions, probs, query_t, layer_of_row, layers, self.threshold,
                                     self.window, self.recent, window)

    def evict(self, view: SlotView) -> torch.Tensor:
        t = view.query_t
        # empty slots hold position -1 and are dropped again harmlessly
        minor = view.state["keep_until"] <= t  # t < w: never marked keys hold w > t
        old_enough = view.positions <= t - (self.recent + 1)
        drop = minor & old_enough
        if self.budget is None:
            return drop
        # Bounded CORM: of what the rule keeps, a stream over its budget drops the keys whose
        # memory ends first (without magnitude: whose last mark is oldest; never marked
        # first; the older key among equals), the recent ones protected.
        kept = dataclasses.replace(view, positions=view.positions.masked_fill(drop, -1))
        return drop | drop_over_budget(kept, -view.state["keep_until"], self.budget, self.recent)
