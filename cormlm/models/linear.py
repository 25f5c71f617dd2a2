"""The one linear layer every projection uses, with a faster decode-time GEMV on CPU.

Why: a decode step at batch 1 is a chain of matrix-vector products, bounded by how fast
the weights stream from memory. On CPU, the BLAS call behind ``F.linear`` for one or a
few rows reaches about 16 GB/s on the 2-core development machine, while the same
product written as a batched GEMM over two halves of the weight (``[out, in]`` viewed as
``[2, out/2, in]``: a free view, nothing copied) reaches 30-40 GB/s, with one thread or
two, at 1-4 rows; at 8 rows it still pays for narrow inputs (1.3-2x) but not for wide
ones. ``scripts/bench_decode.py`` measures what this buys end to end. Larger inputs
(prefill) and other dtypes (bf16 measured slower) or devices keep ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPLIT_MAX_ROWS = 4  # inputs of at most this many rows (batch x tokens) take the split GEMV
SPLIT_MAX_ROWS_NARROW = 8  # ... or this many when the input is at most SPLIT_NARROW_INPUT wide
SPLIT_NARROW_INPUT = 1024  # (measured: 1.3-2x at 8 rows x 768 inputs, 0.8x at 8 x 2048)
SPLIT_PARTS = 2


def takes_split(rows: int, in_features: int) -> bool:
    """Whether a product of ``rows`` input rows is faster as the split GEMV (measured on CPU)."""
    return rows <= SPLIT_MAX_ROWS or (rows <= SPLIT_MAX_ROWS_NARROW and in_features <= SPLIT_NARROW_INPUT)


def split_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` [rows, in] @ ``weight``.T for ``weight`` [out, in] with ``out`` even: [rows, out]."""
    out_features, in_features = weight.shape
    rows = x.shape[0]
    halves = weight.view(SPLIT_PARTS, out_features // SPLIT_PARTS, in_features)
    y = torch.bmm(halves, x.t().expand(SPLIT_PARTS, in_features, rows))  # [2, out/2, rows]
    return y.permute(2, 0, 1).reshape(rows, out_features).contiguous()


@torch.library.custom_op("cormlm::split_gemv", mutates_args=())
def opaque_split_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`split_gemv` as an op inductor cannot see into. Compiled, inductor rewrites the
    bmm of more than one row as a generated reduction that is 5x slower at 8 rows; at one
    row its rewrite is as fast as the bmm and spares this op's Python dispatch."""
    return split_gemv(x, weight)


@opaque_split_gemv.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) with the split GEMV for few rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        rows = x.numel() // self.in_features
        if (takes_split(rows, self.in_features) and weight.device.type == "cpu" and weight.dtype == torch.float32
                and self.out_features % SPLIT_PARTS == 0 and weight.is_contiguous()):
            gemv = opaque_split_gemv if rows > 1 and torch.compiler.is_compiling() else split_gemv
            y = gemv(x.reshape(rows, self.in_features), weight).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, weight, self.bias)
