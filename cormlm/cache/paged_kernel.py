"""The fused decode-attention kernel (``paged_kernel.c``): built once per machine with its C
compiler, loaded through ctypes, and used only where it measures faster than the tensor
operations it replaces.

PyTorch's CPU build has no paged attention kernel, and the tensor-operation version runs a
dozen operations per layer (scores, masks, two segmented reductions, a second product),
whose fixed costs dominate a small model's decode step. The C kernel reads each key and
value once and keeps the per-block intermediates in cache. It is built for the CPU at hand
at first use (:mod:`cormlm.native`).

Which path a call takes is measured, like the linear products' kernels
(:mod:`cormlm.models.linear`): the first calls of each (streams, pool blocks, group, head
size, block size, which probabilities, threads) alternate between the two, timed where they
run, and the faster is kept for the process (pool blocks bucketed to powers of two; the
rule is :mod:`cormlm.trials`). ``CORMLM_PAGED_KERNEL=native`` or ``=torch`` forces one;
:func:`kernel_status` says what was chosen (``scripts/bench_decode.py`` prints it). Compiled
decode steps call the kernel as an opaque operation (``cormlm::paged_decode``) where it is
built: a graph cannot time anything, and inductor's fusion of the tensor operations still
makes several passes over the scores (max, sum, normalisation) where the kernel makes one
over each block while it is in cache (``scripts/bench_compile.py`` measures both);
``CORMLM_PAGED_KERNEL=torch`` gives graphs the tensor operations.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import native, trials

SOURCE = Path(__file__).with_name("paged_kernel.c")
FORCE_ENV = "CORMLM_PAGED_KERNEL"
PATHS = ("native", "torch")
_p, _i64 = ctypes.c_void_p, ctypes.c_int64
KERNEL = native.Kernel(SOURCE, "cormlm_paged_decode_f32",
                       [_p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, ctypes.c_float, _i64, _p, _p, _p, _p,
                        ctypes.c_int, ctypes.c_int, ctypes.c_int])
APPEND = native.Kernel(SOURCE, "cormlm_paged_append_f32",
                       [_p, _p, _p, _p, _p, _p, _i64, _p, _i64, _p, _p, _i64, _i64, _i64])
FREE_SLOTS = native.Kernel(SOURCE, "cormlm_free_slots", [_p, _p, _p, _p, _i64, _i64, _i64, _p, _p])
graph_path = "torch"  # what compiled decode steps call (choose_for_graphs decides it before tracing)
_choices: dict[tuple, str] = {}
_trials: dict[tuple, dict[str, list[float]]] = {}
# Whether the kernel asks for each thread's next block while it computes one, or leaves the
# fetching to the hardware prefetchers: which is faster depends on the machine's prefetchers
# and memory, so it is measured per shape like the paths, in eager calls and graphs alike
# (run() times the kernel itself: a graph calls it as an opaque operation).
PREFETCH = ("software", "hardware")
PREFETCH_ENV = "CORMLM_PAGED_PREFETCH"
_prefetch_choices: dict[tuple, str] = {}
_prefetch_trials: dict[tuple, dict[str, list[float]]] = {}


_workspace = native.Workspace()


def _library() -> Callable[..., None] | None:
    return KERNEL.function()


def workspace(numel: int) -> torch.Tensor:
    """``numel`` float32 scratch elements for the kernel's per-block intermediates, a few
    percent of one layer's keys and values (fresh tensors each call cost page faults that
    added about half again to the kernel's own time at batch 8, every layer, every step)."""
    return _workspace.get(numel)


def available() -> bool:
    """Whether the kernel is built and loaded here (building it on first ask);
    :func:`kernel_status` says why not."""
    return _library() is not None


def fits(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, owner: torch.Tensor,
         q: torch.Tensor, alibi: bool) -> bool:
    """Whether the kernel can run this call: float32 CPU tensors in the pool's own layout, no ALiBi."""
    return (not alibi and q.device.type == "cpu"
            and keys.dtype == values.dtype == q.dtype == torch.float32
            and positions.dtype == torch.int32 and owner.dtype == torch.int64
            and keys.is_contiguous() and values.is_contiguous() and positions.is_contiguous() and owner.is_contiguous())


PROBS_MODES = {None: 0, "heads": 1, "max": 2, "sum": 3}  # the kernel's probs_mode for each ``probs``


def shape_key(keys: torch.Tensor, q: torch.Tensor, probs: str | None) -> tuple:
    """How a call's choices are keyed: (streams, pool blocks to a power of two, group, head
    size, block size, probabilities, threads)."""
    s, g, d = q.shape
    return s, trials.power_of_two(keys.shape[0]), g, d, keys.shape[2], probs, torch.get_num_threads()


def run(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, owner: torch.Tensor, q: torch.Tensor,
        q_pos: torch.Tensor, scale: float, window: int | None, probs: str | None,
        probs_out: torch.Tensor | None = None, key: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel's output [S, G, D] and the probabilities ``probs`` asks for (None: none;
    "heads": [NB, G, block]; "max" / "sum": the group's, [NB, 1, block]; written into
    ``probs_out`` when given, a contiguous tensor of as many elements), the arguments as
    :func:`cormlm.cache.paged_attention.paged_decode_attention` takes them (``key``: the
    call's :func:`shape_key`, where the caller made it already)."""
    kernel = _library()
    assert kernel is not None, "run() called although the kernel is unavailable"
    s, g, d = q.shape
    nb, _, bs = keys.shape
    q = q.contiguous()
    q_pos = q_pos.to(torch.int32).contiguous()
    out = q.new_empty(s, g, d)
    reduce = probs in ("max", "sum")
    given = None if probs_out is None else probs_out.view(nb, 1 if reduce else g, bs)
    work_size, heads = nb * g * (d + 3) + nb + s + 1, probs == "heads"  # (see the kernel's work)
    space = workspace(work_size + (0 if heads else nb * g * bs))
    work = space[:work_size]
    # the per-head probabilities: returned for "heads", else scratch
    per_head = (given if given is not None else q.new_empty(nb, g, bs)) if heads else space[work_size:].view(nb, g, bs)
    reduced = (given if given is not None else q.new_empty(nb, 1, bs)) if reduce else per_head
    key = shape_key(keys, q, probs) if key is None else key
    threads = key[-1]
    fetch, trial = _choose_prefetch(key)
    started = time.perf_counter() if trial else 0.0
    kernel(q.data_ptr(), keys.data_ptr(), values.data_ptr(), positions.data_ptr(), owner.data_ptr(), q_pos.data_ptr(),
           s, g, d, nb, bs, scale, window or 0, out.data_ptr(), per_head.data_ptr(), reduced.data_ptr(),
           work.data_ptr(), PROBS_MODES[probs], threads, fetch == "software")
    if trial:
        trials.record(_prefetch_trials, _prefetch_choices, key, PREFETCH, fetch, time.perf_counter() - started)
    return out, None if probs is None else reduced


def _choose_prefetch(key: tuple) -> tuple[str, bool]:
    """How the kernel fetches blocks for a call keyed ``key`` (forced, decided, or the next
    trial's) and whether the call is a trial."""
    forced = trials.forced(PREFETCH_ENV, PREFETCH, "a decode-attention prefetch", "each shape")
    if forced is not None:
        return forced, False
    return trials.pick(key, PREFETCH, _prefetch_choices, _prefetch_trials)


def append(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, tail: torch.Tensor,
           fill: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor, new_positions: torch.Tensor,
           chosen: torch.Tensor | None = None) -> torch.Tensor | None:
    """A decode step's append (see ``BlockPool.append_one``) in one C call: each stream's new
    key, value and position [S, D] / [S] into slot ``chosen`` [S] or, when None, ``tail *
    block + fill`` of the pool's ``keys`` [NB, D, block], ``values`` [NB, block, D] and
    ``positions`` [NB, block]; returns the slots [S], or None where the call does not fit the
    kernel (the caller's tensor operations then run). Eager only: a traced step keeps the
    tensor operations."""
    kernel = APPEND.function()
    slot_source = (tail, fill) if chosen is None else (chosen,)
    if (kernel is None or torch.compiler.is_compiling() or keys.dtype != torch.float32 or not keys.is_cpu
            or new_keys.dtype != torch.float32 or new_values.dtype != torch.float32
            or new_keys.stride(-1) != 1 or new_values.stride(-1) != 1 or new_positions.dtype != torch.int32
            or not (keys.is_contiguous() and values.is_contiguous() and positions.is_contiguous()
                    and all(t.is_contiguous() for t in slot_source) and new_positions.is_contiguous())):
        return None
    s, d = new_keys.shape
    slots = tail.new_empty(s) if chosen is None else chosen
    tail_ptr, fill_ptr = (tail.data_ptr(), fill.data_ptr()) if chosen is None else (None, None)  # NULL: read slots
    kernel(keys.data_ptr(), values.data_ptr(), positions.data_ptr(), tail_ptr, fill_ptr, new_keys.data_ptr(),
           new_keys.stride(0), new_values.data_ptr(), new_values.stride(0), new_positions.data_ptr(), slots.data_ptr(),
           s, d, keys.shape[2])
    return slots


def free_slots(positions: torch.Tensor, owner: torch.Tensor, bounds: torch.Tensor, streams: int
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``SlotIndex.free_slots`` in one C pass over the regions' used rows (``bounds`` [2,
    regions]: each region's first row and its used rows), each [regions * streams]; or None
    where the kernel is not built or the tensors do not fit it (the caller's tensor
    operations then run)."""
    kernel = FREE_SLOTS.function()
    if (kernel is None or torch.compiler.is_compiling() or positions.dtype != torch.int32
            or not all(t.is_cpu and t.is_contiguous() for t in (positions, owner, bounds))):
        return None
    regions = bounds.shape[1]
    lowest = torch.full((regions * streams,), -1, dtype=torch.long)
    count = torch.zeros(regions * streams, dtype=torch.long)
    kernel(positions.data_ptr(), owner.data_ptr(), bounds[0].data_ptr(), bounds[1].data_ptr(), regions,
           positions.shape[1], streams, lowest.data_ptr(), count.data_ptr())
    return lowest, count


@torch.library.custom_op("cormlm::paged_decode", mutates_args=())
def _graph_op(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, owner: torch.Tensor, q: torch.Tensor,
              q_pos: torch.Tensor, scale: float, window: int, probs: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`run` as one opaque operation of a compiled graph (``probs`` "none": an empty
    second output)."""
    out, reduced = run(keys, values, positions, owner, q, q_pos, scale, window, None if probs == "none" else probs)
    return out, q.new_empty(0) if reduced is None else reduced


@_graph_op.register_fake
def _(keys, values, positions, owner, q, q_pos, scale, window, probs):
    nb, _, bs = keys.shape
    rows = 0 if probs == "none" else q.shape[1] if probs == "heads" else 1
    return q.new_empty(q.shape), q.new_empty((nb, rows, bs) if rows else (0,))


def graph_run(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, owner: torch.Tensor, q: torch.Tensor,
              q_pos: torch.Tensor, scale: float, window: int | None, probs: str | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`run` inside a compiled graph (the same arguments, no ``probs_out``)."""
    out, reduced = _graph_op(keys, values, positions, owner, q, q_pos, scale, window or 0, probs or "none")
    return out, None if probs is None else reduced


def choose_for_graphs() -> str:
    """Decide, before a decode step is traced, what its graph calls for decode attention:
    the kernel (an opaque operation) wherever it is built, unless ``CORMLM_PAGED_KERNEL=torch``
    asks for inductor's fusion of the tensor operations. Kept in :data:`graph_path`, a module
    constant the trace reads (and a saved step is checked against)."""
    global graph_path
    graph_path = "native" if _forced() != "torch" and _library() is not None else "torch"
    return graph_path


def _forced() -> str | None:
    return trials.forced(FORCE_ENV, PATHS, "a decode-attention path", "each shape")


def choose(key: tuple) -> tuple[str, bool]:
    """The path for a call keyed ``key`` (forced, decided, or the next trial's) and whether
    the call is a trial, whose time :func:`record` takes."""
    forced = _forced()
    if forced is not None:
        return (forced if forced == "torch" or _library() is not None else "torch"), False
    if key not in _choices and _library() is None:
        _choices[key] = "torch"
    return trials.pick(key, PATHS, _choices, _trials)


def record(key: tuple, path: str, seconds: float) -> None:
    """One trial call's time; once both paths ran their trials, the faster is kept."""
    trials.record(_trials, _choices, key, PATHS, path, seconds)


_PROBS_LABEL = {None: "", "heads": ", probabilities", "max": ", group-max probabilities",
                "sum": ", group-sum probabilities"}


def _numeric_order(key: tuple) -> tuple:
    return (*key[:5], key[5] or "", key[6])  # (no probabilities sort first)


def kernel_status() -> list[str]:
    """What decode attention runs as, e.g. 'streams 3, up to 64 blocks of 64, group 3, head 64,
    2 threads: native, hardware prefetch' (graphs call the kernel without a trial against the
    tensor operations: their shapes show the prefetch alone)."""
    if KERNEL.unavailable:
        return [f"native kernel unavailable ({KERNEL.unavailable[0]}): tensor operations"]
    fetch = trials.status(_prefetch_trials, _prefetch_choices, PREFETCH)
    lines = []
    for key in sorted(set(_choices) | set(fetch), key=_numeric_order):
        s, nb, g, d, bs, probs, t = key
        name = _choices.get(key, "native")
        if name == "native" and key in fetch:
            name += f", {fetch[key]} prefetch" if fetch[key] in PREFETCH else f", prefetch {fetch[key]}"
        lines.append(f"streams {s}, up to {nb} blocks of {bs}, group {g}, head {d}{_PROBS_LABEL[probs]}, {t} threads: "
                     f"{name}")
    return lines
