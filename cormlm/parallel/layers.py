"""The one layer tensor parallelism adds: an embedding holding a rank's vocabulary rows."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class VocabShardEmbedding(nn.Embedding):
    """Rows ``start .. start + rows`` of the vocabulary's embedding (``embed.weight`` as in the
    whole model, only fewer rows). A token outside them looks up zeros; ``reduce`` (an
    all-reduce) then adds the one rank that owns each token to the zeros of the others: exact."""

    def __init__(self, rows: int, hidden: int, start: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(rows, hidden)
        self.start = start
        self.reduce = reduce

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        return self.reduce(x.masked_fill(~inside[..., None], 0.0))
