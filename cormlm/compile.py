"""``torch.compile`` for every step: the dense work of each block, and decode attention.

Each block is compiled as two graphs, everything before attention (norm, QKV projection,
rotary) and everything after it (output projection, MLP, residuals), plus one for the
final norm and LM head: few graph calls per step, and elementwise work fused around the
GEMMs. ``dynamic=True`` keeps batch and length symbolic, so a graph serves every token
count of its kind; a prompt runs each of those graphs or the block's eager modules,
whichever measures faster for its shape (:mod:`cormlm.models.prompt_blocks`: the modules
chunk a prompt's MLP, a graph cannot). A decode step (one token per row) runs as one
graph: every layer, the cache appends, decode attention, the policy's state update and evictions
(``CausalLM.body``); the pools' block counts are symbolic, so caches that grow,
evict and compact reuse it. Allocation of blocks and compaction run eagerly between steps.
Compiled functions use the modules' parameters: nothing is copied. Their linear layers call
the kernel measured fastest on this machine for each decode batch of up to 8 rows and for
prompts (``cormlm.models.linear.calibrate`` decides before tracing), not whatever inductor
would pick; decode attention calls the C kernel where it is built
(:func:`cormlm.cache.paged_kernel.choose_for_graphs`), and a decode step's blocks the two C
calls of their dense work where those apply (:mod:`cormlm.models.decode_block`). Inductor keeps its
compiled kernels in its on-disk cache, and the decode step is saved whole, trace included
(:mod:`cormlm.compile_cache`), so only a machine's first run pays for compiling it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from . import compile_cache
from .cache import paged_kernel
from .errors import CormlmError
from .models import decode_block

INDUCTOR_OPTIONS = ("freezing", "cpp_wrapper", "max_autotune")  # what scripts/bench_compile.py measures
# Inductor's generated Python checks every kernel's output sizes, strides and alignment at
# run time, several hundred calls per decode step of a 30-layer model (about 2% of its time:
# fewer Python calls, so nowhere slower). cormlm's own operations are held to their fake
# implementations by tests that compile with the checks on (tests/test_compile.py).
DEFAULT_OPTIONS: dict[str, object] = {"size_asserts": False, "alignment_asserts": False}


def compile_model(model: torch.nn.Module, options: dict[str, object] | None = None,
                  log: Callable[[str], None] | None = None) -> torch.nn.Module:
    """Compile ``model`` in place (once: a second call changes nothing); returns the model.

    ``options`` go to inductor as ``torch.compile(options=...)`` for every graph, over
    :data:`DEFAULT_OPTIONS` (its run-time size checks off; ``{"size_asserts": True,
    "alignment_asserts": True}`` turns them back on), e.g.
    ``{"freezing": True}`` (weights folded in as constants and pre-packed), ``{"cpp_wrapper":
    True}`` (the graph's Python wrapper as C++), ``{"max_autotune": True}`` (GEMM templates
    benchmarked at compile time); ``scripts/bench_compile.py`` measures what each buys here.
    ``log`` receives a line when the decode step is compiled ahead of time or loaded from disk
    (:mod:`cormlm.compile_cache`).
    """
    if not hasattr(torch, "compile"):
        raise CormlmError(f"torch {torch.__version__} has no torch.compile; drop --compile")
    if model.compiled:
        return model
    from .pack import is_packed

    if is_packed(model):
        raise CormlmError("compile_model on a model with packed weights (pack_weights): its graphs would need the "
                          "plain weights; load the model again to compile it, or decode it packed and eager")
    if getattr(model, "tp", None) is not None:
        raise CormlmError("torch.compile is not supported with tensor parallelism (its all-reduces run eagerly); "
                          "drop --compile or compile_model() for a model loaded with tp=")
    options = {**DEFAULT_OPTIONS, **(_checked_options(options) or {})}
    where = compile_cache.folder() if compile_cache.supported() else None
    # graphs cannot time kernels: decide decode- and prefill-sized products now (or as measured before)
    compile_cache.calibrate_once(model, where)
    paged_kernel.choose_for_graphs()
    decode_block.choose_for_graphs()
    for block in model.blocks:
        block.prompt_graphs = (torch.compile(block.pre_attention, dynamic=True, options=options),
                               torch.compile(block.post_attention, dynamic=True, options=options))
    model.compiled_head = torch.compile(model.head, dynamic=True, options=options)
    # dynamic=None: sizes stay static but the pools' block counts, which the pool marks dynamic
    decode = _without_duck_sizing(torch.compile(model.body, dynamic=None, options=options))
    if where is not None:
        decode = compile_cache.SavedDecodeStep(model, decode, options, where, log)
    model.compiled_decode = decode
    model.compiled = True
    return model


def _checked_options(options: dict[str, object] | None) -> dict[str, object] | None:
    """``options`` if inductor knows every name (a misspelt one would otherwise fail deep
    inside the first compiled call), else one clear error."""
    if not options:
        return None
    from torch._inductor import config as inductor_config

    unknown = sorted(name for name in options if not hasattr(inductor_config, name))
    if unknown:
        raise CormlmError(f"unknown inductor option(s) {', '.join(map(repr, unknown))} for compile_model; "
                          f"e.g. {', '.join(INDUCTOR_OPTIONS)} (names of torch._inductor.config)")
    return dict(options)


def _without_duck_sizing(compiled: Callable) -> Callable:
    """Each layer's pool grows on its own: pools that happen to share a size when the graph
    is traced must not be given one symbol (that would recompile when they part)."""
    from torch.fx.experimental import _config as fx_config

    @functools.wraps(compiled)
    def call(*args):
        with fx_config.patch(use_duck_shape=False):
            return compiled(*args)

    return call
