"""The one linear layer every projection uses, with a faster decode-time GEMV on CPU.

Why: a decode step at batch 1 is a chain of matrix-vector products, bounded by how fast
the weights stream from memory. On CPU, the BLAS call behind ``F.linear`` for one or a
few rows reaches about 16 GB/s on the 2-core development machine, while the same
product written as a batched GEMM over two halves of the weight (``[out, in]`` viewed as
``[2, out/2, in]``: a free view, nothing copied) reaches 30-40 GB/s, with one thread or
two. ``scripts/bench_decode.py`` measures what this buys end to end. Larger inputs
(prefill) and other dtypes or devices keep ``F.linear``, where the split does not pay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPLIT_MAX_ROWS = 4  # inputs of at most this many rows (batch x tokens) take the split GEMV
SPLIT_PARTS = 2


def split_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` [rows, in] @ ``weight``.T for ``weight`` [out, in] with ``out`` even: [rows, out]."""
    out_features, in_features = weight.shape
    rows = x.shape[0]
    halves = weight.view(SPLIT_PARTS, out_features // SPLIT_PARTS, in_features)
    y = torch.bmm(halves, x.t().expand(SPLIT_PARTS, in_features, rows))  # [2, out/2, rows]
    return y.permute(2, 0, 1).reshape(rows, out_features)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) with the split GEMV for few rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        rows = x.numel() // self.in_features
        if (rows <= SPLIT_MAX_ROWS and weight.device.type == "cpu" and weight.dtype == torch.float32
                and self.out_features % SPLIT_PARTS == 0 and weight.is_contiguous()):
            y = split_gemv(x.reshape(rows, self.in_features), weight).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, weight, self.bias)
