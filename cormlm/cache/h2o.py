"""H2O, the Heavy-Hitter Oracle (Zhang et al., arXiv 2306.14048).

Every key accumulates the attention every query gives it (summed over the query heads of
its KV head's group); at a fixed budget the keys with the lowest sum go first, the recent
ones protected. The prompt's whole attention counts, so prefill scores every query row
(in chunks: see RaggedCache).
"""

from __future__ import annotations

import torch

from .budget import BudgetPolicy
from .policy import SlotView


class H2OPolicy(BudgetPolicy):
    name = "h2o"
    needs_probs = True
    group_reduce = "sum"  # observe adds the group's heads

    def state_fields(self) -> dict[str, tuple[torch.dtype, float]]:
        return {"score": (torch.float32, 0.0)}

    def query_rows(self, num_queries: int) -> int:
        return num_queries

    def observe(self, probs: torch.Tensor, query_t: torch.Tensor, attended: torch.Tensor | None,
                visible: torch.Tensor | None) -> dict[str, torch.Tensor]:
        real = (query_t > 0).to(probs.dtype)  # padding queries give nothing
        return {"score": torch.einsum("...gqs,...q->...s", probs, real)}

    def merge(self, state: dict[str, torch.Tensor], observed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"score": state["score"] + observed["score"]}

    def priority(self, view: SlotView) -> torch.Tensor:
        return -view.state["score"]
