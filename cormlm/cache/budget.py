"""Fixed-budget eviction shared by the baselines: rank each stream's keys, drop the excess.

A budget is a number of tokens or a fraction of the tokens a stream has seen. Every
stream (batch row x KV head) is ranked independently and in one pass over the pool: a
stable sort by (stream, drop priority, position) puts each stream's most droppable
candidates first, and a stream drops as many as it holds over its budget. No Python loop
over rows or heads, no host synchronisation.
"""

from __future__ import annotations

import torch

from ..errors import CacheConfigError
from .policy import EvictionPolicy, SlotView


def budget_tokens(budget: int | float, t: torch.Tensor) -> torch.Tensor:
    """Tokens allowed at 1-indexed step(s) ``t``: ``budget``, or floor(fraction * t + 0.5), at least 1."""
    if isinstance(budget, int):
        return torch.full_like(t, budget, dtype=torch.long)
    return torch.floor(budget * t.double() + 0.5).long().clamp(min=1)


def protected_tokens(recent: int | None, budget_t: torch.Tensor) -> torch.Tensor:
    """Recent positions never dropped: ``recent``, or half the budget when not given."""
    return budget_t // 2 if recent is None else torch.full_like(budget_t, recent)


def check_recent_within_budget(policy: str, budget: int | float | None, recent: int | None, default: bool) -> None:
    """An integer budget must leave room beyond the protected recent positions."""
    if isinstance(budget, int) and recent is not None and recent >= budget:
        raise CacheConfigError(f"{{recent}} ({recent}{', the default' if default else ''}) must be smaller than "
                               f"{policy}'s budget ({{budget}} = {budget}): the recent positions are part of the budget",
                               "recent", "budget")


def drop_over_budget(view: SlotView, priority: torch.Tensor, budget: int | float,
                     recent: int | None) -> torch.Tensor:
    """Bool [NB, block]: per stream, the (held - budget) candidates of highest ``priority``.

    Candidates are held keys older than the protected recent positions; ties go to the
    older position first. A stream with fewer candidates than its excess drops them all.
    """
    nb, bs = view.positions.shape
    streams = view.stream_t.numel()
    budget_t = budget_tokens(budget, view.stream_t)  # [S]
    protect_t = protected_tokens(recent, budget_t)
    owner = view.owner[:, None].expand(nb, bs)
    held = view.positions >= 0
    stream = torch.where(held, owner, streams).reshape(-1)  # empty slots sort after every stream
    safe = stream.clamp(max=streams - 1)
    position = view.positions.reshape(-1).long()
    candidate = held.reshape(-1) & (position <= view.stream_t[safe] - 1 - protect_t[safe])
    held_count = torch.zeros(streams + 1, dtype=torch.long, device=position.device)
    held_count.index_add_(0, stream, torch.ones_like(stream))
    excess = (held_count[:streams] - budget_t).clamp(min=0)
    # One key appended per stream since the last eviction left no stream over budget with a
    # candidate to spare, so at most one candidate per stream goes: no sort, and no sync.
    if view.single_step or (position.device.type == "cpu" and int(excess.max()) <= 1):
        return _drop_one(stream, safe, priority.reshape(-1), position, candidate, excess).view(nb, bs)
    # sort keys, least significant first: position ascending, priority descending, candidates first, stream
    order = torch.argsort(position, stable=True)
    order = order[torch.argsort(priority.reshape(-1)[order].float(), descending=True, stable=True)]
    order = order[torch.argsort((~candidate[order]).to(torch.int8), stable=True)]
    order = order[torch.argsort(stream[order], stable=True)]
    sorted_stream = stream[order]
    starts = torch.cumsum(held_count, 0) - held_count
    rank = torch.arange(order.numel(), device=order.device) - starts[sorted_stream]
    excess_of = torch.cat([excess, excess.new_zeros(1)])[sorted_stream]
    drop_sorted = (rank < excess_of) & candidate[order]
    drop = torch.zeros_like(drop_sorted)
    drop[order] = drop_sorted
    return drop.view(nb, bs)


def _drop_one(stream, safe, priority, position, candidate, excess) -> torch.Tensor:
    """The same choice when no stream is more than one key over: per stream, the candidate
    of highest priority, the oldest among equals (two scatter reductions instead of sorts).
    On CPU the host check that allows this is free; on GPU the sort path avoids the sync."""
    streams = excess.numel()
    neg_inf = torch.tensor(float("-inf"), device=priority.device)
    prio = torch.where(candidate, priority.float(), neg_inf)
    top = torch.full((streams + 1,), float("-inf"), device=prio.device).scatter_reduce(
        0, stream, prio, reduce="amax", include_self=True)
    best = candidate & (prio == top[stream])
    big = torch.iinfo(torch.long).max
    oldest = torch.full((streams + 1,), big, dtype=torch.long, device=prio.device).scatter_reduce(
        0, stream, torch.where(best, position, big), reduce="amin", include_self=True)
    return best & (position == oldest[stream]) & (excess[safe] > 0) & (stream < streams)


class BudgetPolicy(EvictionPolicy):
    """A fixed budget per stream (tokens or a fraction of the tokens seen), the ``recent``
    newest positions protected (default: half the budget): subclasses only say which keys
    go first, through :meth:`priority`."""

    parameters = ("budget", "recent")
    help = {"budget": "keys kept per KV head: tokens (int) or a fraction of those seen (float)",
            "recent": "newest positions never evicted (default: half the budget)"}

    @classmethod
    def check(cls, given: dict) -> None:
        if given["budget"] is None:
            raise CacheConfigError(f"policy '{cls.name}' keeps a fixed number of keys: give {{budget}} (tokens, e.g. "
                                   "512, or a fraction of the sequence, e.g. 0.3)", "budget")
        check_recent_within_budget(cls.name, given["budget"], given["recent"], given["recent"] is None)

    def __init__(self, budget: int | float, recent: int | None) -> None:
        self.budget = budget
        self.recent = recent

    def priority(self, view: SlotView) -> torch.Tensor:
        """[NB, block]: higher goes first."""
        raise NotImplementedError

    def evict(self, view: SlotView) -> torch.Tensor:
        return drop_over_budget(view, self.priority(view), self.budget, self.recent)
