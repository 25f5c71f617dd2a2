"""A compiled model's multi-token calls (prompts): each half of each block's dense work by
its compiled graph or by the block's eager modules, whichever measures faster here.

``compile_model`` compiles each block's two halves around attention for such calls
(``Block.prompt_graphs``), where inductor fuses the elementwise work around the products
(a prompt's rotary embedding: fewer passes than the modules make). The eager modules do
what a graph cannot: a prompt's MLP runs in chunks of rows (:mod:`cormlm.models.mlp`), so
no [rows, 2 x intermediate] activation is made and faulted in again on every layer. Neither
is assumed faster: like the products' kernels, the first calls of each (half, hidden size,
row bucket, dtype, threads) alternate between the two, timed where they run, and the faster
is kept for the process (:mod:`cormlm.trials`; a graph's first call, which compiles it, is
the untimed warm-up). ``CORMLM_PROMPT_BLOCKS=graphs`` or ``=eager`` forces one;
:func:`kernel_status` says what was chosen (``scripts/bench_decode.py`` prints it). Decode
steps are not concerned: a compiled model runs those as one graph (:mod:`cormlm.compile`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .. import trials

if TYPE_CHECKING:
    from .transformer import Block

FORCE_ENV = "CORMLM_PROMPT_BLOCKS"
PATHS = ("graphs", "eager")
_choices: dict[tuple, str] = {}
_trials: dict[tuple, dict[str, list[float]]] = {}


def _forced() -> str | None:
    return trials.forced(FORCE_ENV, PATHS, "a prompt-block path", "each prompt shape")


def choose(half: str, x: torch.Tensor) -> tuple[str, tuple | None]:
    """The path of ``half`` ("pre" or "post" attention) on rows ``x`` [..., hidden] (forced,
    decided, or the next trial's) and, for a trial call, the key its time is recorded under."""
    forced = _forced()
    if forced is not None:
        return forced, None
    key = (half, x.shape[-1], trials.power_of_two(x.numel() // x.shape[-1]), str(x.dtype).removeprefix("torch."),
           torch.get_num_threads())
    path, trial = trials.pick(key, PATHS, _choices, _trials)
    return path, key if trial else None


def measured_halves(block: Block) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``block``'s pre_attention and post_attention for a compiled model's multi-token call:
    each call by the path chosen for its own rows (the last block's post_attention may take
    only the last row)."""
    pre_graph, post_graph = block.prompt_graphs
    return _measured("pre", block.pre_attention, pre_graph), _measured("post", block.post_attention, post_graph)


def _measured(half: str, modules: Callable[..., Any], graph: Callable[..., Any]) -> Callable[..., Any]:
    def call(x: torch.Tensor, *rest: Any) -> Any:
        path, key = choose(half, x)
        run = graph if path == "graphs" else modules
        if key is None:
            return run(x, *rest)
        started = time.perf_counter()
        out = run(x, *rest)
        trials.record(_trials, _choices, key, PATHS, path, time.perf_counter() - started)
        return out

    return call


def kernel_status() -> list[str]:
    """What each half runs as per prompt shape, e.g. 'post-attention, hidden 576, up to 4096
    rows, float32, 2 threads: eager' (or 'still measuring' where the trials have not ended)."""
    states = trials.status(_trials, _choices, PATHS)
    return [f"{half}-attention, hidden {hidden}, up to {rows} row{'s' * (rows > 1)}, {dtype}, "
            f"{threads} thread{'s' * (threads > 1)}: {state}"
            for (half, hidden, rows, dtype, threads), state in sorted(states.items(), key=_order)]


def _order(item: tuple[tuple, str]) -> tuple:
    half, *rest = item[0]
    return (rest, half != "pre")
