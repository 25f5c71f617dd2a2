"""A whole eviction policy in one file, as a user would add one: keep the even positions and
the ``recent`` newest keys. Defining the class registers it; nothing else is edited."""

import torch

from cormlm.cache.policy import EvictionPolicy, SlotView


class KeepEvenPolicy(EvictionPolicy):
    name = "keep-even"
    parameters = ("recent",)
    defaults = {"recent": 4}
    help = {"recent": "newest positions kept whatever their parity (4)"}

    def __init__(self, recent: int) -> None:
        self.recent = recent

    def evict(self, view: SlotView) -> torch.Tensor:
        old = view.positions <= view.query_t - (self.recent + 1)  # 0-indexed positions, 1-indexed t
        return old & (view.positions % 2 == 1)
