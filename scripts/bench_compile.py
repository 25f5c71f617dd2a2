"""What inductor's CPU inference options buy cormlm's compiled decoding, in one process.

    python scripts/bench_compile.py                 # SmolLM2-135M, batch 1, 1k context, full cache
    python scripts/bench_compile.py --quick         # the embedded toy model, a few steps (tests)

One copy of the model per variant: ``eager`` (not compiled), ``default``
(``cormlm.compile_model(model)``, whose graphs skip inductor's run-time size checks:
``cormlm.compile.DEFAULT_OPTIONS``), ``size-checks`` (those checks on, as inductor's own
default), then ``compile_model(model, options={name: True})`` for
each of ``--options`` (default: ``freezing``, weights folded into the graph as constants
and pre-packed; ``cpp_wrapper``, the graph's Python wrapper generated as C++;
``max_autotune``, GEMM templates benchmarked at compile time), and ``attention-ops``: the
default, but decode attention as tensor operations fused by inductor instead of the C
kernel the graphs call where it is built (:mod:`cormlm.cache.paged_kernel`; left out where
it is not). Each compiled variant
reports its warm-up (compiling during the first prefill and two decode steps) and the
resident memory that warm-up added (a variant that keeps a second copy of the weights
shows it; the first compiled variant's figure also holds inductor's own one-off memory).
Then every variant prefills the same ``--context`` random tokens and they decode in
alternation, one timed step each, ``--steps`` times: tok/s is one over the median step,
and ratios are to ``default`` in the same run. Inductor writes to a fresh cache folder
unless ``--warm-cache``, so every warm-up is a first compile; saved decode steps
(``cormlm.compile_cache``) are off: the options are measured on ``torch.compile``'s path.
A variant that fails to compile is reported with its error and left out of the timing.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
from bench_decode import describe_machine, reset_peak_rss

import cormlm
from cormlm.cache import paged_kernel
from cormlm.checkpoint.real_model import resolve_model_argument
from cormlm.compile import DEFAULT_OPTIONS, INDUCTOR_OPTIONS

TENSOR_OPS = "attention-ops"  # the variant whose graphs fuse decode attention's tensor operations
SIZE_CHECKS = "size-checks"  # the default with inductor's run-time checks of kernel outputs on
CHECKS_ON = {name: True for name in DEFAULT_OPTIONS}


def warm_up(model, ids: torch.Tensor) -> tuple[float, cormlm.KVCache, torch.Tensor]:
    """Seconds for the first prefill and two decode steps (the compiling, for a compiled model)."""
    started = time.perf_counter()
    cache, token = prefill(model, ids)
    for _ in range(2):
        token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - started, cache, token


def prefill(model, ids: torch.Tensor) -> tuple[cormlm.KVCache, torch.Tensor]:
    cache = cormlm.make_cache(model, cormlm.CacheConfig("full"), batch_size=ids.shape[0])
    return cache, model(ids, cache=cache, last_logits_only=True)[:, -1].argmax(-1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 (the real model), weights (the embedded toy), "
                                                           "a checkpoint folder, GGUF file or hub id")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=48, help="timed decode steps of each variant")
    parser.add_argument("--options", nargs="*", default=list(INDUCTOR_OPTIONS), choices=INDUCTOR_OPTIONS,
                        help="inductor options, each compiled on its own beside the default")
    parser.add_argument("--warm-cache", action="store_true", help="use inductor's usual cache folder (later runs load)")
    parser.add_argument("--quick", action="store_true", help="the embedded toy model, 32 tokens, 4 steps")
    args = parser.parse_args()
    if args.quick:
        args.model, args.context, args.steps = "weights", 32, 4
    if args.context < 1 or args.steps < 1:
        parser.error("--context and --steps must be >= 1")
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="cormlm-inductor-")
    os.environ["CORMLM_COMPILE_CACHE"] = "off"  # each variant traces and compiles its own step

    print("# inductor options for compiled decoding\n")
    for line in describe_machine("cpu"):
        print(f"- {line}")
    source = resolve_model_argument(args.model)
    base = cormlm.load_model(source, dtype=torch.float32)
    print(f"- model: {args.model} ({base.config.num_layers} layers), float32, batch 1, full cache, context "
          f"{args.context}, {args.steps} alternated decode steps; inductor cache: "
          f"{'the usual folder' if args.warm_cache else 'a fresh folder (every warm-up compiles)'}; "
          f"no saved decode steps\n", flush=True)
    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (1, args.context))

    variants: dict[str, dict | None] = {"eager": None, "default": {}, SIZE_CHECKS: CHECKS_ON,
                                        **{name: {name: True} for name in args.options}}
    if paged_kernel.choose_for_graphs() == "native":
        variants[TENSOR_OPS] = {}
    # what each variant's graphs call for decode attention: a module constant their traces read
    # (and guard on), so it is set before each of the variant's calls
    graph_path = {name: "torch" if name == TENSOR_OPS else paged_kernel.graph_path for name in variants}
    models, warm, added, failed = {}, {}, {}, {}
    with torch.inference_mode():
        for name, options in variants.items():
            print(f"  [{name}] warming up", file=sys.stderr, flush=True)
            model = copy.deepcopy(base)
            before = reset_peak_rss()
            try:
                if options is not None:
                    cormlm.compile_model(model, options=options or None)
                paged_kernel.graph_path = graph_path[name]
                warm[name], _, _ = warm_up(model, ids)
            except Exception as error:  # noqa: BLE001 - a variant inductor cannot build is a result, not a crash
                failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                continue
            after = reset_peak_rss()
            added[name] = None if before is None or after is None else (after - before) / 1024
            models[name] = model
        del base

        states = {name: prefill(model, ids) for name, model in models.items()}
        step_s: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.steps):
            for name, model in models.items():
                cache, token = states[name]
                paged_kernel.graph_path = graph_path[name]
                started = time.perf_counter()
                token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
                step_s[name].append(time.perf_counter() - started)
                states[name] = (cache, token)

    tps = {name: 1 / statistics.median(times) for name, times in step_s.items()}
    reference = tps.get("default")
    print("| variant | warm-up s | memory added MiB | decode tok/s | vs default |")
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        if name in failed:
            print(f"| {name} | failed | - | - | - |")
            continue
        memory = "-" if added[name] is None else f"{added[name]:.0f}"
        ratio = f"{tps[name] / reference:.2f}x" if reference else "-"
        print(f"| {name} | {warm[name]:.2f} | {memory} | {tps[name]:.2f} | {ratio} |")
    for name, error in failed.items():
        print(f"\n- {name} failed to compile: {error}")
    if TENSOR_OPS not in variants:
        print(f"\n- {TENSOR_OPS} left out: the decode-attention kernel is not built here "
              f"({'; '.join(paged_kernel.KERNEL.unavailable) or 'CORMLM_PAGED_KERNEL=torch'})")


if __name__ == "__main__":
    main()
