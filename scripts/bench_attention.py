"""Decode attention alone: cormlm's attention over its ragged block pool against PyTorch's dense
SDPA over a full cache, at the same shapes, in one process, ratios from the same run.

    python scripts/bench_attention.py                     # SmolLM2-135M's heads, batch 1 and 8, 1k and 4k keys
    python scripts/bench_attention.py --batch 1 --contexts 16384 --rounds 500

bench_decode.py times whole decode steps, where attention is one cost among the projections,
the MLP and the cache's bookkeeping; this isolates it. For each batch and context, one layer's
random float32 keys and values are prefilled through the public cache (``build_cache``) into a
"full" and a "corm" cache, each with its policy's default block size, so the kernels read the
layout the library really builds (keys transposed per block, the bucketed pool's free blocks
included). No ``end_step`` runs, so CORM evicts nothing: every implementation reads the same
``context`` keys per stream, and one query per batch row (at position ``context``):

- ``dense-sdpa``: ``scaled_dot_product_attention(q [B, Hq, 1, D], k/v [B, Hkv, L, D],
  enable_gqa=True)`` over the contiguous keys and values the caches were prefilled with;
- ``paged-full``: ``paged_decode_attention(probs=None)`` over the full policy's pool,
  the attention of a full cache's decode step;
- ``paged-corm-probs``: ``probs="max"`` (the group's max, what CORM reads) over the CORM pool
  (its smaller blocks): what CORM
  pays to read probabilities (its state update not included).

Each paged row is timed twice, as the fused C kernel (``native``, see
:mod:`cormlm.cache.paged_kernel`) and as the tensor operations it replaces (``tensor ops``):
the library measures the same two where it runs and keeps the faster.

Before timing, every output is checked against SDPA's (assert_close, atol 1e-4), so the table
can never compare different computations. Then, after ``--warmup`` calls of each, ``--rounds``
rounds of one call of each (the order rotating per round), each call timed with
``time.perf_counter`` under ``torch.inference_mode``: a machine whose speed drifts slows all
alike. Figures are median microseconds per call and their ratio to SDPA's in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_decode import describe_machine

from cormlm import CacheConfig
from cormlm.cache import paged_kernel
from cormlm.cache.paged import BlockPool, stream_live_counts
from cormlm.cache.paged_attention import tensor_decode_attention
from cormlm.cache.registry import build_cache
from cormlm.models.attention_ops import AttentionSpec

PAGED = {"paged-full": ("full", None), "paged-corm-probs": ("corm", "max")}
PATHS = ("native", "tensor ops")
COLUMNS = ("batch", "context", "implementation", "blocks in pool", "µs per call", "vs dense SDPA")


def prefilled_pool(policy: str, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> BlockPool:
    """Layer 0's pool of a ``policy`` cache (its default block size) after a prefill of ``k``/``v``
    [B, Hkv, L, D]: built by the library's own append path, not by hand."""
    b, hkv, length, d = k.shape
    cache = build_cache(CacheConfig(policy), batch_size=b, num_layers=1, num_kv_heads=hkv, head_dim=d,
                        dtype=k.dtype, device=k.device, sliding_window=None, query_group=None)
    positions, _ = cache.begin_step(None, length)
    cache.attend(0, torch.randn(b, spec.num_heads, length, d, dtype=k.dtype), k, v, positions, spec)
    pool = cache.pools[0]
    live = stream_live_counts(pool.positions, pool.owner, b * hkv)
    assert bool((live == length).all()), f"{policy} pool holds {live.tolist()} keys per stream, not {length}"
    return pool


def time_rounds(calls: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, float]:
    """Median µs per call of each, timed one call of each per round (order rotating per round)."""
    names = list(calls)
    for _ in range(warmup):
        for call in calls.values():
            call()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            start = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) * 1e6 for name, times in seconds.items()}


def bench(batch: int, context: int, args: argparse.Namespace) -> dict[str, tuple[str, float]]:
    """{implementation: (blocks in pool, median µs per call)} for one batch and context."""
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    spec = AttentionSpec(num_heads=hq, num_kv_heads=hkv, head_dim=d, scale=d**-0.5)
    k, v = (torch.randn(batch, hkv, context, d) for _ in range(2))
    q = torch.randn(batch, hq, 1, d)
    full, corm = prefilled_pool("full", k, v, spec), prefilled_pool("corm", k, v, spec)
    q_streams = q.view(batch * hkv, hq // hkv, d)  # [S, G, D]: query heads grouped per KV head, as enable_gqa pairs them
    q_pos = torch.full((batch * hkv,), context, dtype=torch.int32)

    pools = {"full": full, "corm": corm}

    def paged(pool: BlockPool, probs: str | None, path: str) -> Callable[[], torch.Tensor]:
        if path == "native":
            return lambda: paged_kernel.run(pool.keys, pool.values, pool.positions, pool.owner, q_streams, q_pos,
                                            spec.scale, None, probs)[0]
        return lambda: tensor_decode_attention(pool.keys, pool.values, pool.positions, pool.owner, q_streams, q_pos,
                                                spec, probs)[0]

    paths = PATHS if paged_kernel.available() else PATHS[1:]
    calls = {"dense-sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
    blocks = {"dense-sdpa": "-"}
    for name, (policy, probs) in PAGED.items():
        for path in paths:
            calls[f"{name} ({path})"] = paged(pools[policy], probs, path)
            blocks[f"{name} ({path})"] = str(pools[policy].capacity)
    reference = calls["dense-sdpa"]()
    for name in list(calls)[1:]:
        torch.testing.assert_close(calls[name]().view_as(reference), reference, atol=1e-4, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name} differs from dense SDPA: {m}")
    micros = time_rounds(calls, args.rounds, args.warmup)
    return {name: (blocks[name], micros[name]) for name in calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch rows (one query each)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096], help="keys per stream")
    parser.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    parser.add_argument("--kv-heads", type=int, default=3, help="KV heads (SmolLM2-135M: 3)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds, one call of each per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls of each before the rounds")
    args = parser.parse_args()
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if min(args.batch + args.contexts + [args.rounds, args.head_dim]) < 1 or args.warmup < 0:
        parser.error("batches, contexts, rounds and head_dim must be >= 1, warmup >= 0")

    torch.manual_seed(0)
    print("# decode attention: cormlm's paged attention against dense SDPA\n")
    for line in describe_machine("cpu"):
        print(f"- {line}")
    if not paged_kernel.available():
        print(f"- {paged_kernel.kernel_status()[0]}")
    print(f"- shape: {args.heads} query heads, {args.kv_heads} KV heads, head_dim {args.head_dim}, float32; "
          f"block size full {CacheConfig('full').slots_per_block()}, corm {CacheConfig('corm').slots_per_block()}; "
          f"{args.rounds} rounds after {args.warmup} warm-up calls\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS), flush=True)
    summary = []
    with torch.inference_mode():
        for batch in args.batch:
            for context in args.contexts:
                results = bench(batch, context, args)
                sdpa = results["dense-sdpa"][1]
                for name, (blocks, micros) in results.items():
                    print(f"| {batch} | {context} | {name} | {blocks} | {micros:.1f} | {micros / sdpa:.2f}x |", flush=True)
                for path in PATHS:
                    if f"paged-full ({path})" not in results:
                        continue
                    paged, probs = results[f"paged-full ({path})"][1], results[f"paged-corm-probs ({path})"][1]
                    summary.append(f"- batch {batch}, context {context}, {path}: paged {paged / sdpa:.2f}x dense SDPA's "
                                   f"time, paged + probabilities (CORM layout) {probs / sdpa:.2f}x, i.e. "
                                   f"{probs / paged:.2f}x paged")
    print("\n" + "\n".join(summary))
    if paged_kernel.available():  # the kernel's prefetch is a trial per shape, run in the warm-up and first rounds
        print("\ncormlm decode attention's prefetch per pool shape (the kernel's own trials):")
        print("\n".join(f"- {line}" for line in paged_kernel.kernel_status()))


if __name__ == "__main__":
    main()
