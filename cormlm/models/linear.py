"""The one linear layer every projection uses; CPU products take whichever kernel is
faster on the machine the code runs on.

Seven kernels compute ``x @ weight.T`` on CPU, and which is fastest depends on the CPU and
its BLAS (each has been 1.5-3x faster than another on some machine, for some row count):

- ``linear``: ``F.linear``, the BLAS torch was built with (MKL on x86 wheels);
- ``split``: matrix-vector-like products (at most ``SPLIT_MAX_ROWS`` rows) as a batched
  GEMM over the weight's two halves (``[out, in]`` viewed as ``[2, out/2, in]``, a free view);
- ``onednn``: oneDNN's inner product straight from the stored weight (no packed copy, so no
  extra memory), where torch was built with oneDNN (float32 and bfloat16);
- ``linear_t`` and ``onednn_t``: products of at most ``TRANSPOSED_MAX_ROWS`` rows as
  ``weight @ x.T``, transposed back (the large matrix as the rows of the product);
- ``rows``: float32 products of at most ``ROWS_MAX`` rows by a C kernel built for the CPU at
  hand (``rows_gemm.c``, :mod:`cormlm.native`; absent where no compiler is), which streams
  each weight row once against every input row, asking for the rows ahead non-temporally
  near the core, the input rows in column chunks of half the L1;
- ``rows_l2``: the same kernel asking for the rows ahead into the L2, the input rows whole
  (the first plan's chunks paid on a Zen 5 EPYC; on a Zen 4 one this plan read 1.4-1.5x
  faster at 8 rows).

Nothing is tuned in advance: the first products of each (shape, row bucket, dtype, threads)
rotate over the kernels that can run them and are timed where they run, inside the model's
own steps, so the weights are as cold or as hot in cache as they are in real use (timing one
weight over and over, as a micro-benchmark does, finds it hot and misjudges a model that
streams from DRAM). After ``TRIALS`` timed calls of each, the fastest is kept for the process
(another kernel only where it beats ``F.linear`` by ``MARGIN`` or beyond the trials' spread). Rows are bucketed (exact up to
8, then powers of two), so prompts of any length share a few decisions. :func:`kernel_choices`
lists what was chosen (``scripts/bench_decode.py`` prints it); ``CORMLM_LINEAR_KERNEL`` forces
one kernel wherever it can run. GPU tensors, float64 and products that need gradients through
oneDNN use ``F.linear``. A compiled graph cannot time anything: ``cormlm.compile_model``
decides the products of every decode batch of 1-8 rows and prefill-sized ones first
(:func:`calibrate`), and its graphs call those kernels (oneDNN and the C kernel as opaque
custom ops), F.linear for anything left undecided.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import native, trials
from ..trials import TRIALS, decided, next_trial

SPLIT_MAX_ROWS = 8  # the split only ever targets matrix-vector-like products
TRANSPOSED_MAX_ROWS = 16  # weight @ x.T only pays for a few input rows
SPLIT_PARTS = 2
ROWS_MAX = 8  # the C kernel's rows (one function per row count, its accumulators in registers)
MARGIN = 0.9  # another kernel whose median is 10% faster replaces F.linear (or one steadily faster: see decided)
FORCE_ENV = "CORMLM_LINEAR_KERNEL"
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
ROWS_PLANS = {"rows": 0, "rows_l2": 1}  # the C kernel's two plans (rows_gemm.c's PLAN_L1, PLAN_L2), measured apart
NO_GRADIENT = frozenset({"onednn", "onednn_t", *ROWS_PLANS})  # kernels autograd cannot differentiate
_choices: dict[tuple, str] = {}  # (out, in, row bucket, dtype, threads) -> kernel name
_trials: dict[tuple, dict[str, list[float]]] = {}  # same key -> kernel -> seconds of each trial call
_broken: set[str] = set()  # kernels that raised on this machine (not offered again)
_graph_choices: dict[tuple, str] = {}  # (out, in, row bucket, dtype) -> kernel: what compiled graphs call (see calibrate)
_decisions = 0  # bumped whenever _choices changes (see decisions())


def split_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [rows, in] @ ``weight``.T (+ ``bias``) for ``weight`` [out, in] with ``out`` even: [rows, out]."""
    out_features, in_features = weight.shape
    rows = x.shape[0]
    halves = weight.view(SPLIT_PARTS, out_features // SPLIT_PARTS, in_features)
    y = torch.bmm(halves, x.t().expand(SPLIT_PARTS, in_features, rows))  # [2, out/2, rows]
    y = y.permute(2, 0, 1).reshape(rows, out_features).contiguous()
    return y if bias is None else y + bias


_p, _i64 = ctypes.c_void_p, ctypes.c_int64
ROWS_GEMM = native.Kernel(Path(__file__).with_name("rows_gemm.c"), "cormlm_rows_gemm_f32",
                          [_p, _p, _p, _p, _i64, _i64, _i64, ctypes.c_int, ctypes.c_int])


def rows_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, plan: int = 0) -> torch.Tensor:
    """``x`` [rows <= 8, in] @ ``weight``.T (+ ``bias``) by the C kernel (float32, a contiguous
    weight): each weight row streamed once against every input row, by ``plan`` (where the
    weight rows ahead are asked for: see :data:`ROWS_PLANS` and rows_gemm.c)."""
    function = ROWS_GEMM.function()
    assert function is not None, "rows_gemm called although the kernel is unavailable"
    x = x.contiguous()  # (the weight is: candidates and graph_linear offer this kernel no other)
    rows, in_features = x.shape
    y = x.new_empty(rows, weight.shape[0])
    function(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.contiguous().data_ptr(), y.data_ptr(),
             rows, weight.shape[0], in_features, torch.get_num_threads(), plan)
    return y


@torch.library.custom_op("cormlm::rows_gemm", mutates_args=())
def _rows_gemm_graph_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: int) -> torch.Tensor:
    """:func:`rows_gemm` as one opaque operation of a compiled graph."""
    return rows_gemm(x, weight, bias, plan)


@_rows_gemm_graph_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's inner product on the weight as stored (it is not reordered into a packed copy)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("cormlm::onednn_linear", mutates_args=())
def _onednn_graph_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`onednn_linear` as one opaque operation of a compiled graph (inductor would not call it)."""
    return onednn_linear(x, weight, bias)


@_onednn_graph_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def transposed(kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``kernel`` run as ``weight @ x.T`` (the weight as the product's rows, the few input rows
    as its small operand) and transposed back: oneDNN then never reorders the large matrix,
    and the BLAS takes a different GEMM path."""
    def run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = kernel(weight, x, None).t().contiguous()
        return y if bias is None else y + bias
    return run


KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "linear": F.linear, "split": split_gemv, "onednn": onednn_linear,
    "linear_t": transposed(F.linear), "onednn_t": transposed(onednn_linear),
    **{name: functools.partial(rows_gemm, plan=plan) for name, plan in ROWS_PLANS.items()}}
GRAPH_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    **KERNELS, "onednn": _onednn_graph_op, "onednn_t": transposed(_onednn_graph_op),
    **{name: functools.partial(_rows_gemm_graph_op, plan=plan) for name, plan in ROWS_PLANS.items()}}
CALIBRATION_ROWS = (*range(1, ROWS_MAX + 1), 256)  # decided before tracing: decode batches, and any symbolic (prefill) row count
NAMES = {"linear": "F.linear", "split": "split GEMV", "onednn": "oneDNN", "linear_t": "F.linear, transposed",
         "onednn_t": "oneDNN, transposed", "rows": "C few-row kernel", "rows_l2": "C few-row kernel, L2 prefetch"}


@functools.cache
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def row_bucket(rows: int) -> int:
    """Rows as a choice is keyed: exact up to 8 (decode batches), then the next power of two."""
    return rows if rows <= SPLIT_MAX_ROWS else 1 << (rows - 1).bit_length()


def _forced() -> str | None:
    return trials.forced(FORCE_ENV, tuple(KERNELS), "a kernel", "each product")


def _fits(name: str, rows: int, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether kernel ``name`` can compute a product of ``rows`` rows of these shapes and dtypes
    (what both eager trials and compiled graphs obey)."""
    if name == "split":
        return rows <= SPLIT_MAX_ROWS and weight.shape[0] % SPLIT_PARTS == 0
    if name in ROWS_PLANS:  # (and built here: see _usable)
        return 1 <= rows <= ROWS_MAX and weight.dtype == x.dtype == torch.float32 and weight.device.type == "cpu"
    if name.endswith("_t") and rows > TRANSPOSED_MAX_ROWS:
        return False
    return not name.startswith("onednn") or weight.dtype in ONEDNN_DTYPES and x.dtype == weight.dtype


def candidates(x: torch.Tensor, weight: torch.Tensor) -> list[str]:
    """The kernels that can run this product ([rows, in] ``x``), F.linear first; only F.linear
    for GPU tensors, float64 and compiled graphs."""
    if weight.device.type != "cpu" or torch.compiler.is_compiling() or not weight.is_contiguous():
        return ["linear"]
    grad = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)
    return [name for name in KERNELS if _usable(name) and _fits(name, x.shape[0], x, weight)
            and not (grad and name in NO_GRADIENT)]


def _usable(name: str) -> bool:
    """Whether kernel ``name`` runs on this machine: its library is there (oneDNN in this torch
    build, the C kernel built) and it has not failed here."""
    if name in _broken:
        return False
    if name.startswith("onednn"):
        return _onednn_available()
    return name not in ROWS_PLANS or ROWS_GEMM.function() is not None


def _key(weight: torch.Tensor, rows: int) -> tuple:
    return (*weight.shape, row_bucket(rows), weight.dtype, torch.get_num_threads(), weight.device.type)


def products_decided(weights: list[torch.Tensor], rows: int) -> bool:
    """Whether eager products of ``rows`` rows by each of ``weights`` have their kernel decided
    here (or forced): their trials are over."""
    if _forced() is not None:
        return True
    return all(_key(w, rows) in _choices for w in weights)


def decisions() -> int:
    """A count that changes whenever a product's eager choice does (for caches derived from them)."""
    return _decisions


def rows_plan(weight: torch.Tensor, rows: int, graph: bool = False) -> int:
    """The C kernel's plan measured fastest for products of ``rows`` rows by ``weight`` (eagerly
    or, with ``graph``, in compiled graphs): what a caller running that kernel itself (the
    block's C calls) should use; the first plan where another kernel or none was chosen."""
    forced = _forced()
    if forced is not None and not graph:  # (graphs: calibrate records the forced kernel)
        return ROWS_PLANS.get(forced, 0)
    if graph:
        choice = _graph_choices.get((weight.shape[0], weight.shape[1], row_bucket(rows), weight.dtype))
    else:
        choice = _choices.get(_key(weight, rows))
    return ROWS_PLANS.get(choice, 0)


def _call(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if name == "linear":
        return KERNELS["linear"](x, weight, bias)
    try:
        return KERNELS[name](x, weight, bias)
    except RuntimeError:  # e.g. a oneDNN build without this primitive: never offered again
        global _decisions
        _decisions += 1
        _broken.add(name)
        for key, choice in list(_choices.items()):
            if choice == name:
                del _choices[key]
        return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [rows, in] @ ``weight``.T (+ ``bias``) by the kernel chosen for this product on
    this machine; while the choice is open, this call is one of the timed trials (a slower
    kernel runs at most ``TRIALS + 1`` times per key)."""
    names = candidates(x, weight)
    if len(names) == 1:
        return F.linear(x, weight, bias)
    forced = _forced()
    if forced is not None:
        return _call(forced if forced in names else "linear", x, weight, bias)
    key = _key(weight, x.shape[0])
    choice = _choices.get(key)
    if choice is not None and choice in names:
        return _call(choice, x, weight, bias)
    times = _trials.setdefault(key, {})
    name = next_trial(names, times)  # rotate: F.linear first, then whichever ran least
    started = time.perf_counter()
    y = _call(name, x, weight, bias)
    times.setdefault(name, []).append(time.perf_counter() - started)
    choice = decided([n for n in names if n not in _broken], times, baseline="linear", margin=MARGIN)
    if choice is not None:
        global _decisions
        _decisions += 1
        _choices[key] = choice
        del _trials[key]
    return y


def _product(out: int, inp: int, rows: int, dtype: torch.dtype) -> str:
    return (f"{out}x{inp}, {rows} row{'s' * (rows > 1)}{' (bucket)' * (rows > SPLIT_MAX_ROWS)}, "
            f"{str(dtype).removeprefix('torch.')}")


def kernel_choices() -> list[str]:
    """What each measured product runs as, e.g. '576x576, 1 row, float32, 2 threads: F.linear'."""
    return [f"{_product(out, inp, rows, dtype)}, {threads} threads: {NAMES[name]}"
            for (out, inp, rows, dtype, threads, _), name in sorted(_choices.items(), key=str)]


def graph_kernel_choices() -> list[str]:
    """What compiled graphs call per product (:func:`calibrate`'s decisions, or those saved with
    a compiled step), e.g. '576x576, 1 row, float32: C few-row kernel'."""
    return [f"{_product(out, inp, rows, dtype)}: {NAMES[name]}"
            for (out, inp, rows, dtype), name in sorted(_graph_choices.items(), key=str)]


def graph_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Inside a compiled graph: the kernel already measured for this product (a graph cannot
    time anything), F.linear where none was. Products of several tokens per row (graphs for
    any prompt length) take the choice of ``CALIBRATION_ROWS[-1]`` rows."""
    # One token per row is the decode graph, whose sizes are static; any other graph may have
    # symbolic lengths, and asking their value would specialise it (a graph per prompt length).
    one_token = x.dim() >= 2 and x.shape[-2] == 1
    bucket_rows = row_bucket(x.numel() // weight.shape[1] if one_token else CALIBRATION_ROWS[-1])
    choice = "linear"
    if weight.device.type == "cpu" and weight.is_contiguous():  # a plain dict lookup: nothing for dynamo to break on
        choice = _graph_choices.get((weight.shape[0], weight.shape[1], bucket_rows, weight.dtype), "linear")
    if choice == "linear" or not _fits(choice, bucket_rows, x, weight):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, weight.shape[1])
    return GRAPH_KERNELS[choice](flat, weight, bias).view(*x.shape[:-1], weight.shape[0])


@torch.inference_mode()
def calibrate(model: nn.Module, rows: tuple[int, ...] = CALIBRATION_ROWS) -> None:
    """Decide now, by the same in-place trials, the kernel of every product of ``model``'s
    linear layers at these row counts (what a compiled graph will use). Trials go through
    the layers in model order, so each weight is as cold as in a forward pass."""
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    forced = _forced()
    for n in rows if forced is None else ():  # a forced kernel needs no trials
        inputs: dict[tuple, torch.Tensor] = {}
        pending = True
        for _ in range(len(KERNELS) * (TRIALS + 1)):  # every key is decided within this many passes
            if not pending:
                break
            pending = False
            for layer in layers:
                w = layer.weight
                x = inputs.setdefault((w.shape[1], w.dtype, w.device), torch.randn(n, w.shape[1], dtype=w.dtype, device=w.device))
                if _key(w, n) in _choices or len(candidates(x, w)) == 1:
                    continue
                pending = True
                linear(x, w, layer.bias)
    threads = torch.get_num_threads()
    _graph_choices.clear()
    _graph_choices.update({(out, inp, n, dtype): name for (out, inp, n, dtype, t, device), name in _choices.items()
                           if t == threads and device == "cpu" and name not in _broken})
    if forced is not None and _usable(forced):
        _graph_choices.update({(*layer.weight.shape, row_bucket(n), layer.weight.dtype): forced
                               for layer in layers for n in rows})


def graph_choices() -> dict[tuple, str]:
    """What compiled graphs call per (out, in, row bucket, dtype), as :func:`calibrate` decided."""
    return dict(_graph_choices)


def adopt_graph_choices(choices: dict[tuple, str]) -> bool:
    """Take ``choices`` (an earlier :func:`calibrate`'s for the same model on this machine:
    the caller's to match) instead of measuring again, unless a kernel is forced or one they
    name is unknown or broken here; returns whether they were taken."""
    if _forced() is not None or not all(name in GRAPH_KERNELS and _usable(name) for name in choices.values()):
        return False
    _graph_choices.clear()
    _graph_choices.update(choices)
    return True


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) with the kernel measured fastest here,
    or, once :meth:`pack` ran, oneDNN's product on its own blocked copy of the weight."""

    packed: torch.Tensor | None = None  # oneDNN's blocked weight (see pack); None: the plain weight

    def pack(self, rows: int) -> None:
        """Reorder the weight into oneDNN's blocked layout for products of about ``rows`` rows
        and drop the plain one (``weight`` stays as a meta tensor: its shape and dtype, no
        storage), so the layer holds one copy of its weight either way."""
        from . import decode_block  # (which imports this module)

        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), rows)
        self.weight = nn.Parameter(self.weight.detach().to("meta"), requires_grad=False)
        decode_block.changed()  # a block holding this layer no longer fits the C calls

    def part(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Output features ``start:stop`` alone: ``x`` [rows, in] @ ``weight[start:stop]``.T (+ its
        bias), by the kernel measured for that block's shape (a block of the weight's rows is a
        contiguous matrix of its own, so nothing is copied)."""
        bias = None if self.bias is None else self.bias[start:stop]
        if self.packed is not None:  # oneDNN's blocked layout cannot be sliced: the whole product
            return self.forward(x)[:, start:stop]
        return linear(x, self.weight[start:stop], bias)

    def forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``x @ weight.T + bias``; ``bias=False`` leaves the bias out (a row-parallel shard's
        partial product, whose bias is added once after the all-reduce)."""
        b = self.bias if bias else None
        if self.packed is not None:
            rows = x.numel() // self.in_features
            return onednn_linear(x.reshape(rows, self.in_features), self.packed, b).view(*x.shape[:-1], self.out_features)
        if torch.compiler.is_compiling():
            return graph_linear(x, self.weight, b)
        rows = x.numel() // self.in_features
        choice = _choices.get(_key(self.weight, rows))
        # decided, not forced, no gradient: straight to the kernel (the decode hot path)
        if choice is not None and os.environ.get(FORCE_ENV) is None \
                and not (torch.is_grad_enabled() and self.weight.requires_grad):
            if choice == "linear":
                return F.linear(x, self.weight, b)
            return _call(choice, x.reshape(rows, self.in_features), self.weight, b).view(*x.shape[:-1], self.out_features)
        return linear(x.reshape(rows, self.in_features), self.weight, b).view(*x.shape[:-1], self.out_features)
