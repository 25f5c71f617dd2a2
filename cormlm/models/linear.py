"""The one linear layer every projection uses; decode-sized CPU products take whichever
kernel is faster on the machine the code runs on.

A decode step at batch 1 is a chain of matrix-vector products bounded by how fast the
weights stream from memory. On CPU two kernels compute it: the BLAS call behind
``F.linear``, and the same product as a batched GEMM over the two halves of the weight
(``[out, in]`` viewed as ``[2, out/2, in]``: a free view, nothing copied). Which streams
faster depends on the CPU and its BLAS (each has been 2-3x faster than the other on some
machine), so nothing here is tuned in advance: the first products of each (shape, rows,
dtype, threads) alternate between the two kernels and are timed where they run, inside the
model's own steps, so the weights are as cold or as hot in cache as they are when decoding
(timing one weight over and over, as a micro-benchmark does, finds it hot and misjudges a
model that streams from DRAM). After ``TRIALS`` timed calls of each, the faster one is kept
for the process. :func:`gemv_choices` lists what was chosen (``scripts/bench_decode.py``
prints it); ``CORMLM_GEMV=linear`` or ``=split`` forces one kernel. Products of more rows
(prefill), GPU tensors and compiled graphs (inductor picks its own kernels) always use
``F.linear``.
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
TRIALS = 8  # timed calls of each kernel per shape (after one untimed warm-up call each)
_choices: dict[tuple, bool] = {}  # (out, in, rows, dtype, threads) -> split is faster
_trials: dict[tuple, tuple[list[float], list[float]]] = {}  # same key -> (F.linear, split) seconds


def split_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` [rows, in] @ ``weight``.T for ``weight`` [out, in] with ``out`` even: [rows, out]."""
    out_features, in_features = weight.shape
    rows = x.shape[0]
    halves = weight.view(SPLIT_PARTS, out_features // SPLIT_PARTS, in_features)
    y = torch.bmm(halves, x.t().expand(SPLIT_PARTS, in_features, rows))  # [2, out/2, rows]
    return y.permute(2, 0, 1).reshape(rows, out_features).contiguous()


def _run(split: bool, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not split:
        return F.linear(x, weight, bias)
    y = split_gemv(x, weight)
    return y if bias is None else y + bias


def _forced() -> str | None:
    value = os.environ.get("CORMLM_GEMV")
    if value is None:
        return None
    value = value.strip().lower()
    return value if value in ("linear", "split") else None


def _measured(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the split GEMV is measured for this product at all (decode-sized CPU eager)."""
    return not (x.shape[0] > MEASURED_MAX_ROWS or weight.device.type != "cpu" or not weight.is_contiguous()
                or weight.shape[0] % SPLIT_PARTS or torch.compiler.is_compiling())


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [rows, in] @ ``weight``.T (+ ``bias``) by the kernel chosen for this product on
    this machine; while the choice is open, this call is one of the timed trials (the slower
    kernel runs at most ``TRIALS + 1`` times per shape)."""
    if not _measured(x, weight):
        return F.linear(x, weight, bias)
    forced = _forced()
    if forced is not None:
        return _run(forced == "split", x, weight, bias)
    key = (*weight.shape, x.shape[0], weight.dtype, torch.get_num_threads())
    choice = _choices.get(key)
    if choice is not None:
        return _run(choice, x, weight, bias)
    times = _trials.setdefault(key, ([], []))
    split = len(times[1]) < len(times[0])  # alternate: F.linear first, then whichever ran less
    started = time.perf_counter()
    y = _run(split, x, weight, bias)
    times[split].append(time.perf_counter() - started)
    if min(map(len, times)) > TRIALS:  # the first call of each is a warm-up, not counted
        linear_s, split_s = (statistics.median(t[1:]) for t in times)
        _choices[key] = split_s < SPLIT_MARGIN * linear_s
        del _trials[key]
    return y


def gemv_choices() -> list[str]:
    """What each measured product shape runs as, e.g. '576x576, 1 row, float32: F.linear'."""
    return [f"{out}x{inp}, {rows} row{'s' * (rows > 1)}, {str(dtype).removeprefix('torch.')}, {threads} threads: "
            f"{'split GEMV' if split else 'F.linear'}"
            for (out, inp, rows, dtype, threads), split in sorted(_choices.items(), key=str)]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) with the split GEMV where it measured faster."""

    def forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``x @ weight.T + bias``; ``bias=False`` leaves the bias out (a row-parallel shard's
        partial product, whose bias is added once after the all-reduce)."""
        b = self.bias if bias else None
        rows = x.numel() // self.in_features
        if rows > MEASURED_MAX_ROWS or torch.compiler.is_compiling():
            return F.linear(x, self.weight, b)
        # decided for F.linear and not forced otherwise: no reshapes (the decode hot path)
        key = (self.out_features, self.in_features, rows, self.weight.dtype, torch.get_num_threads())
        if _choices.get(key) is False and _forced() is None:
            return F.linear(x, self.weight, b)
        return gemv(x.reshape(rows, self.in_features), self.weight, b).view(*x.shape[:-1], self.out_features)
