"""Full vs CORM on the same model: bytes held, retained fraction, decode speed.

    python scripts/bench_cache.py                 # SmolLM2-135M-Instruct, contexts 1k, 4k, 8k
    python scripts/bench_cache.py --model random --contexts 1024 16384

``--model smollm2`` (default) is the real model (scripts/real_model.py); ``--model random``
a Llama-3-shaped model with random weights whose q/k projections are scaled up
(``--peaky``) so that attention is concentrated as in trained models (with flat random
attention CORM would, correctly, keep almost everything); or any folder / .gguf file. Each (policy, context) is
prefilled once, then decoded ``repeats`` x ``steps`` tokens; the figure per repeat is the
median step time, and the table shows the median over repeats. Ratios are against
``full`` measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import cormlm
from cormlm.checkpoint.random_weights import write_random_llama
from cormlm.checkpoint.real_model import REAL_MODEL, resolve_model_argument


def decode_step_seconds(model, cache, token: torch.Tensor, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = model.forward_unchecked(token, None, cache, last_logits_only=True)
        token = logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def measure(model, policy: cormlm.CacheConfig, context: int, steps: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=gen)
    cache = cormlm.make_cache(model, policy, batch_size=1)
    start = time.perf_counter()
    logits = model(prompt, cache=cache, last_logits_only=True)
    prefill = time.perf_counter() - start
    token = logits[:, -1].argmax(-1, keepdim=True)
    decode_step_seconds(model, cache, token, 2)  # warm-up
    per_repeat = [statistics.median(decode_step_seconds(model, cache, token, steps)) for _ in range(repeats)]
    stats = cache.stats()
    return {"prefill_s": prefill, "step_s": statistics.median(per_repeat), "bytes": stats.bytes_held,
            "bytes_full": stats.bytes_full, "retained": stats.retained_fraction}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=REAL_MODEL, help="smollm2 (default), random, weights, a folder or .gguf")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8000])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--recent", type=int, default=256)
    parser.add_argument("--peaky", type=float, default=8.0, help="scale of the q/k projections")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "random":
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_random_llama(Path(tmp), max_positions=max(args.contexts) + 64, qk_scale=args.peaky)
            model = cormlm.load_model(folder, dtype=torch.float32, device="cpu")
    else:
        model = cormlm.load_model(resolve_model_argument(args.model), dtype=torch.float32, device="cpu")
    c = model.config
    print(f"model: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads / {c.num_kv_heads} KV heads, "
          f"head_dim {c.head_dim}, fp32, {torch.get_num_threads()} threads; corm w={args.window} r={args.recent}; "
          f"median of {args.repeats} repeats x {args.steps} decode steps", file=sys.stderr)
    policies = [cormlm.CacheConfig("full"), cormlm.CacheConfig("corm", window=args.window, recent=args.recent)]
    print("| context | policy | retained | KV bytes held | bytes vs full | decode tok/s | speed vs full |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for context in args.contexts:
        rows = []
        for policy in policies:
            print(f"  measuring {policy.policy} at {context} tokens ...", file=sys.stderr, flush=True)
            rows.append((policy.policy, measure(model, policy, context, args.steps, args.repeats)))
        base = rows[0][1]
        for name, r in rows:
            print(f"| {context} | {name} | {r['retained']:.1%} | {r['bytes'] / 2**20:.2f} MiB | "
                  f"{r['bytes'] / base['bytes']:.2f}x | {1 / r['step_s']:.1f} | {base['step_s'] / r['step_s']:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
