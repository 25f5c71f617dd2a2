"""Causal attention over a whole prompt: cormlm's own C kernel (``prompt_attention.c``) or
PyTorch's flash kernel, whichever measures faster on the machine at hand.

A prompt's attention is a fifth or more of its time on a CPU. PyTorch's flash kernel masks
the causal triangle inside blocks of 512 keys and treats each query head on its own; the C
kernel runs each KV head's group of query heads together over 64-key blocks up to each
query's own position (see the C file), and hands a policy the log-probabilities of the rows
it scores from the same pass (PyTorch's path scores them again). Neither is assumed faster:
like the linear products' kernels (:mod:`cormlm.models.linear`), the first calls of each
(batch, heads, KV heads, length bucket, head size, what else is asked for, threads) alternate
between the two, timed where they run with whatever work each path does for the call, and
the faster is kept for the process (:mod:`cormlm.trials`).
``CORMLM_PROMPT_ATTENTION=native`` or ``=sdpa`` forces one; :func:`kernel_status` says what
was chosen (``scripts/bench_decode.py`` prints it). The kernel takes float32 CPU tensors of
plain causal attention (no window, no ALiBi, queries and keys alike long), without
gradients and outside compiled graphs; everything else runs SDPA.
"""

from __future__ import annotations

import ctypes
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from .. import native, trials
from ..trials import next_trial

SOURCE = Path(__file__).with_name("prompt_attention.c")
FORCE_ENV = "CORMLM_PROMPT_ATTENTION"
PATHS = ("native", "sdpa")
_p, _i64 = ctypes.c_void_p, ctypes.c_int64
KERNEL = native.Kernel(SOURCE, "cormlm_prompt_attention_f32",
                       [_p, _i64, _i64, _i64, _p, _i64, _i64, _i64, _p, _i64, _i64, _i64,
                        _i64, _i64, _i64, _i64, _i64, ctypes.c_float, _p, _p, _i64, _p, ctypes.c_int, _p,
                        ctypes.c_int])
WORK = native.Kernel(SOURCE, "cormlm_prompt_attention_work", [_i64, _i64, _i64, _i64, _i64, _i64, ctypes.c_int],
                     restype=ctypes.c_int64)
# the kernel's workspace (keys transposed, each thread's scratch) is kept between calls up to
# this size (a 1k SmolLM2 prompt's under CORM: 1.4 MiB); a larger one is made per call and
# freed with it (its page faults cost little against such a call's arithmetic), so no long
# prompt leaves memory behind
WORKSPACE_KEPT = 16 * 2**20
_workspace = native.Workspace()
_choices: dict[tuple, str] = {}
_trials: dict[tuple, dict[str, list[float]]] = {}

Attention = tuple[torch.Tensor, torch.Tensor | None]  # output [B, Hq, T, D], log-sum-exp [B, Hq, T] or None
Result = TypeVar("Result")


def available() -> bool:
    """Whether the kernel is built and loaded here (building it on first ask)."""
    return KERNEL.function() is not None and WORK.function() is not None


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel can run this plain causal call: float32 CPU queries [B, Hq, T, D]
    and keys/values [B, Hkv, T, D] (any strides, the head dimension contiguous), no gradient,
    not inside a compiled graph."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32
            and q.shape[2] == k.shape[2] == v.shape[2] and q.shape[1] % k.shape[1] == 0
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and available())


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, with_lse: bool) -> Attention:
    """The kernel's causal attention of ``q`` over ``k``/``v`` (see :func:`fits`): the output
    [B, Hq, T, D] (a view of a [B, T, Hq, D] tensor, the output projection's layout) and, with
    ``with_lse``, each query's log-sum-exp of its scaled scores [B, Hq, T]."""
    out, lse, _ = _call(q, k, v, scale, with_lse, 0)
    return out, lse


def run_scored(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, rows: int,
               group_max: bool = False, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`run`'s output, and the log-probabilities of the last ``rows`` queries over every
    key [B, Hkv, G, rows, T] (float32, -inf where a key comes after the query), as
    :func:`cormlm.cache.ragged.explicit_log_probs` lays them out, or with ``group_max`` their
    maximum over each group's heads [B, Hkv, 1, rows, T] (what a policy whose ``group_reduce``
    is "max" reads); in the first elements of ``scratch`` (a float32 tensor at least that
    large) when given."""
    out, _, log_probs = _call(q, k, v, scale, False, rows, group_max, scratch)
    return out, log_probs


def _call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, with_lse: bool, rows: int,
          group_max: bool = False, scratch: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    rows = min(rows, t)
    threads = torch.get_num_threads()
    size = WORK.function()(b, hq, hkv, t, d, rows, threads)
    work = _workspace.get(size) if size * 4 <= WORKSPACE_KEPT else torch.empty(size)
    out = q.new_empty(b, t, hq, d)
    lse = q.new_empty(b, hq, t) if with_lse else None
    shape = (b, hkv, 1 if group_max else hq // hkv, rows, t)
    log_probs = None if not rows else q.new_empty(shape) if scratch is None else scratch[:math.prod(shape)].view(shape)
    KERNEL.function()(q.data_ptr(), *_strides(q), k.data_ptr(), *_strides(k), v.data_ptr(), *_strides(v),
                      b, hq, hkv, t, d, scale, out.data_ptr(), 0 if lse is None else lse.data_ptr(),
                      rows, 0 if log_probs is None else log_probs.data_ptr(), int(group_max), work.data_ptr(),
                      threads)
    return out.transpose(1, 2), lse, log_probs


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """A [B, H, T, D] tensor's batch, head and position strides (elements)."""
    return x.stride(0), x.stride(1), x.stride(2)


def _forced() -> str | None:
    return trials.forced(FORCE_ENV, PATHS, "a prompt-attention path", "each shape")


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, with_lse: bool,
           sdpa: Callable[[], Attention]) -> Attention:
    """Plain causal attention of a whole prompt by the path chosen for its shape here: the
    kernel, or ``sdpa()`` (PyTorch's, returning the same pair; the log-sum-exp None where it
    gives none)."""
    return choose(q, k, v, "log-sum-exp" if with_lse else "", lambda: run(q, k, v, scale, with_lse), sdpa)


def choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, asked: str, native: Callable[[], Result],
           sdpa: Callable[[], Result]) -> Result:
    """``native()`` (work around the kernel) or ``sdpa()`` (the same work around PyTorch's
    kernel, the same result) by the path chosen for this call's shape and ``asked`` (what else
    the call computes, which the timings include) here; ``sdpa()`` where the kernel does not
    fit. While the choice is open, this call is one of the timed trials."""
    if not fits(q, k, v):
        return sdpa()
    forced = _forced()
    if forced is not None:
        return native() if forced == "native" else sdpa()
    b, hq, t, d = q.shape
    key = (b, hq, k.shape[1], trials.power_of_two(t), d, asked, torch.get_num_threads())
    choice = _choices.get(key)
    if choice is None:
        times = _trials.setdefault(key, {})
        choice = next_trial(PATHS, times)
        started = time.perf_counter()
        result = native() if choice == "native" else sdpa()
        trials.record(_trials, _choices, key, PATHS, choice, time.perf_counter() - started)
        return result
    return native() if choice == "native" else sdpa()


def kernel_status() -> list[str]:
    """What prompt attention runs as, one line per shape, e.g. 'batch 1, 9 heads over 3, up to
    1024 positions, head 64, 256 rows' log-probabilities, group maxima, 2 threads: native' (or 'still
    measuring' where the trials have not ended)."""
    if KERNEL.unavailable:
        return [f"native kernel unavailable ({KERNEL.unavailable[0]}): SDPA"]
    states = trials.status(_trials, _choices, PATHS)
    return [f"batch {b}, {hq} heads over {hkv}, up to {t} positions, head {d}{', ' * bool(asked)}{asked}, "
            f"{threads} thread{'s' * (threads > 1)}: {state}"
            for (b, hq, hkv, t, d, asked, threads), state in sorted(states.items())]
