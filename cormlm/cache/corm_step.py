"""CORM's eager decode-step bookkeeping (mark, evict, count) as one C pass over every layer's
slots (``corm_step.c``), where CormPolicy's tensor operations would make about a dozen.

Used by :class:`cormlm.cache.corm.CormPolicy` for the rule as docs/corm.md states it (no
budget, no magnitude) on float32 CPU state; anything else, or no C compiler, takes the
tensor operations, which the tests hold the kernel equal to.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .. import native

_p, _i64 = ctypes.c_void_p, ctypes.c_int64
KERNEL = native.Kernel(Path(__file__).with_name("corm_step.c"), "cormlm_corm_decode_step",
                       [_p, _p, _p, _p, _i64, _p, _i64, _i64, ctypes.c_float, ctypes.c_float, _i64, _i64, _p, _i64,
                        ctypes.c_int])
KERNEL.flags = tuple(flag for flag in native.FLAGS if flag != "-ffast-math")  # exact IEEE comparisons


def fits(keep_until: torch.Tensor, positions: torch.Tensor, probs: torch.Tensor, query_t: torch.Tensor) -> bool:
    """Whether the kernel can run this step: CPU tensors as the pool keeps them, probabilities
    already reduced over the query group (one row of ``block`` per slot row)."""
    rows, block = positions.shape
    return (positions.device.type == "cpu" and keep_until.dtype == probs.dtype == torch.float32
            and positions.dtype == query_t.dtype == torch.int32
            and keep_until.shape == positions.shape and probs.numel() == rows * block
            and query_t.numel() in (1, rows)
            and keep_until.is_contiguous() and positions.is_contiguous() and probs.is_contiguous()
            and query_t.is_contiguous() and KERNEL.function() is not None)


def decode_step(keep_until: torch.Tensor, positions: torch.Tensor, probs: torch.Tensor, query_t: torch.Tensor,
                layer_of_row: torch.Tensor, layers: int, threshold: float, window: int, recent: int,
                sliding_window: int | None) -> list[int]:
    """Mark, evict and count in place (see ``corm_step.c``); returns each layer's live keys."""
    rows, block = positions.shape
    live = torch.zeros(layers, dtype=torch.long)
    layer_of_row = layer_of_row.contiguous()
    KERNEL.function()(keep_until.data_ptr(), positions.data_ptr(), probs.data_ptr(), query_t.data_ptr(),
                      0 if query_t.numel() == 1 else 1, layer_of_row.data_ptr(), rows, block, threshold,
                      float(window), recent, sliding_window or 0, live.data_ptr(), layers, torch.get_num_threads())
    return live.tolist()
