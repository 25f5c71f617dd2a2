"""Scissorhands (Liu et al., arXiv 2305.17118): keys that were unimportant to many recent
queries will stay unimportant ("persistence of importance").

A query finds a key unimportant when no query head of the group gives it the uniform
share 1/len(kept) of its attention. Over the last ``window`` queries the key's
unimportance count decides: at a fixed budget the most often unimportant go first (the
older first among equals), the recent ones protected.

State per key: a 64-bit ring of verdicts, bit ``u mod 64`` = "unimportant to query u";
a count over the window is a popcount of the window's bits, so the exact sliding count
costs one integer per key whatever the window (<= 64).
"""

from __future__ import annotations

import torch

from ..errors import CacheConfigError
from .budget import BudgetPolicy
from .policy import SlotView, group_max

RING = 64  # verdicts remembered per key: the history window's upper bound


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 (SWAR; arithmetic shifts are harmless under the masks)."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return ((x * 0x0101010101010101) >> 56) & 0xFF


def query_bits(query_t: torch.Tensor) -> torch.Tensor:
    """Ring bit of each query (0 for padding, t = 0)."""
    return torch.where(query_t > 0, torch.ones_like(query_t, dtype=torch.long) << (query_t.long() % RING), 0)


class ScissorhandsPolicy(BudgetPolicy):
    name = "scissorhands"
    parameters = ("budget", "recent", "window")
    defaults = {"window": 32}
    help = {**BudgetPolicy.help, "window": f"history: the queries whose verdicts count (32, at most {RING})"}

    @classmethod
    def check(cls, given: dict) -> None:
        super().check(given)
        if given["window"] is not None and given["window"] > RING:
            raise CacheConfigError(f"{{window}} must be <= {RING} for scissorhands (its history window of queries), "
                                   f"got {given['window']}", "window")
    needs_probs = True
    needs_attended = True
    group_reduce = "max"  # a key is important if some head of the group gives it its share

    def __init__(self, budget: int | float, recent: int | None, window: int) -> None:
        super().__init__(budget, recent)
        self.window = window

    def state_fields(self) -> dict[str, tuple[torch.dtype, float]]:
        return {"unimportant": (torch.int64, 0)}

    def query_rows(self, num_queries: int) -> int:
        return min(self.window, num_queries)

    def observe(self, probs: torch.Tensor, query_t: torch.Tensor, attended: torch.Tensor | None,
                visible: torch.Tensor | None) -> dict[str, torch.Tensor]:
        threshold = 1.0 / attended.float().clamp(min=1)
        # some head of the group gives the key its share iff the group's max does (one threshold per query)
        important = group_max(probs).squeeze(-3) >= threshold[..., :, None]  # [..., Q, S]
        bits = query_bits(query_t)[..., :, None]  # [..., Q, 1]
        unimportant = torch.where(important, 0, bits.expand_as(important))
        if visible is not None:  # a query judges only the keys it could see (that existed)
            unimportant = unimportant.masked_fill(~visible, 0)
        written = bits.sum(dim=-2)  # distinct bits: the queries' ring slots, [..., 1]
        return {"unimportant": unimportant.sum(dim=-2), "written": written.expand(unimportant.shape[:-2] +
                                                                                   unimportant.shape[-1:])}

    def merge(self, state: dict[str, torch.Tensor], observed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"unimportant": (state["unimportant"] & ~observed["written"]) | observed["unimportant"]}

    def priority(self, view: SlotView) -> torch.Tensor:
        """How many of the last ``window`` queries found the key unimportant."""
        t = view.query_t.long()  # [NB, 1]: window = queries t - w + 1 .. t
        offsets = torch.arange(self.window, device=t.device)
        window_bits = query_bits(t - offsets).sum(dim=-1, keepdim=True)  # distinct ring slots (w <= 64)
        return popcount(view.state["unimportant"] & window_bits)
