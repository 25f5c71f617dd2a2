"""Key-norm eviction (Devoto et al., arXiv 2406.11430): keys with a low L2 norm draw the
most attention, so at a fixed budget the highest-norm keys go first, the recent ones
protected. It needs no attention scores, so it runs with any attention kernel.
"""

from __future__ import annotations

import torch

from .budget import BudgetPolicy
from .policy import SlotView


class KNormPolicy(BudgetPolicy):
    name = "knorm"

    def state_fields(self) -> dict[str, tuple[torch.dtype, float]]:
        return {"norm": (torch.float32, 0.0)}

    def stored(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"norm": torch.linalg.vector_norm(keys.float(), dim=-1)}

    def priority(self, view: SlotView) -> torch.Tensor:
        return view.state["norm"]
