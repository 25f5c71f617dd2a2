"""The one linear layer every projection uses; decode-sized CPU products take whichever
kernel is faster on the machine the code runs on.

A decode step at batch 1 is a chain of matrix-vector products bounded by how fast the
weights stream from memory. On CPU two kernels compute it: the BLAS call behind
``F.linear``, and the same product as a batched GEMM over the two halves of the weight
(``[out, in]`` viewed as ``[2, out/2, in]``: a free view, nothing copied). Which streams
faster depends on the CPU and its BLAS (each has been 2-3x faster than the other on some
machine), so nothing here is tuned in advance: the first product of each (shape, rows,
dtype) times both kernels on the real weight and keeps the faster one for the process.
:func:`gemv_choices` lists what was chosen (``scripts/bench_decode.py`` prints it);
``CORMLM_GEMV=linear`` or ``=split`` forces one kernel. Products of more rows (prefill),
GPU tensors and compiled graphs (inductor picks its own kernels) always use ``F.linear``.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

MEASURED_MAX_ROWS = 8  # the split only ever targets matrix-vector-like products
SPLIT_PARTS = 2
SPLIT_MARGIN = 0.9  # the split must be at least 10% faster to replace the standard kernel
_choices: dict[tuple, bool] = {}  # (out, in, rows, dtype, threads) -> split is faster


def split_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` [rows, in] @ ``weight``.T for ``weight`` [out, in] with ``out`` even: [rows, out]."""
    out_features, in_features = weight.shape
    rows = x.shape[0]
    halves = weight.view(SPLIT_PARTS, out_features // SPLIT_PARTS, in_features)
    y = torch.bmm(halves, x.t().expand(SPLIT_PARTS, in_features, rows))  # [2, out/2, rows]
    return y.permute(2, 0, 1).reshape(rows, out_features).contiguous()


def _seconds_per_call(fn, budget: float = 1e-3) -> float:
    """Time per call of ``fn``, calling it until ``budget`` seconds have passed."""
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= budget:
            return elapsed / calls


def measure_split(x: torch.Tensor, weight: torch.Tensor, pairs: int = 5) -> bool:
    """Whether the split GEMV beats ``F.linear`` on this machine for this product.

    The two kernels are timed in alternation and compared by the median of their ratios,
    so that load from other processes, which comes and goes, weighs on both alike.
    """
    with torch.inference_mode():
        def linear() -> None:
            F.linear(x, weight)

        def split() -> None:
            split_gemv(x, weight)

        linear(), split()  # warm-up: first-touch of the output buffers, BLAS thread start
        ratios = [_seconds_per_call(split) / _seconds_per_call(linear) for _ in range(pairs)]
    return statistics.median(ratios) < SPLIT_MARGIN


def _forced() -> str | None:
    value = os.environ.get("CORMLM_GEMV", "").strip().lower()
    return value if value in ("linear", "split") else None


def takes_split(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this product (``x`` [rows, in]) runs as the split GEMV: measured once per shape."""
    rows = x.shape[0]
    if (rows > MEASURED_MAX_ROWS or weight.device.type != "cpu" or not weight.is_contiguous()
            or weight.shape[0] % SPLIT_PARTS or torch.compiler.is_compiling()):
        return False
    forced = _forced()
    if forced is not None:
        return forced == "split"
    key = (*weight.shape, rows, weight.dtype, torch.get_num_threads())
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = measure_split(x, weight)
    return choice


def gemv_choices() -> list[str]:
    """What each measured product shape runs as, e.g. '576x576, 1 row, float32: F.linear'."""
    return [f"{out}x{inp}, {rows} row{'s' * (rows > 1)}, {str(dtype).removeprefix('torch.')}, {threads} threads: "
            f"{'split GEMV' if split else 'F.linear'}"
            for (out, inp, rows, dtype, threads), split in sorted(_choices.items(), key=str)]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) with the split GEMV where it measured faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= MEASURED_MAX_ROWS:
            flat = x.reshape(rows, self.in_features)
            if takes_split(flat, self.weight):
                y = split_gemv(flat, self.weight).view(*x.shape[:-1], self.out_features)
                return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)
