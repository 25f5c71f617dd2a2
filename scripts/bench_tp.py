"""Tensor-parallel decode on CPU: N ranks (torchrun, gloo) against one process, on a named machine.

    python scripts/bench_tp.py                # the random 124.7M Llama of bench_decode, 2 ranks
    python scripts/bench_tp.py --quick        # a small model, one round (what the test runs)
    python scripts/bench_tp.py --threads-per-rank 4   # on a machine with 8 cores or more
    python scripts/bench_tp.py --dtype float64 --rounds 1 --repeats 1   # exactness, not speed

Each configuration is its own torchrun launch: one process with N x T threads (the baseline:
the same cores as the split), one process with T threads, and N ranks with T threads each
(OMP_NUM_THREADS=T, so that the ranks do not oversubscribe the cores; T =
``--threads-per-rank``, 1 by default: on 2 cores, 2 ranks of one thread against one process
of two). Each launch loads the checkpoint (``tp=N``
for N ranks), warms up, then per policy (full cache, CORM) generates ``--steps`` greedy
tokens after a ``--context``-token prompt, ``--repeats`` times. Rounds alternate the
configurations so that load from other processes weighs on all of them alike; decode
tokens/s are medians over rounds and repeats, and ratios are to the baseline measured in
the same run.

"Logits vs baseline": the largest difference of the last position's logits after the same
256-token prompt, relative to the largest logit. "Greedy tokens": how many of each run's
generated tokens equal the baseline's before the first that differs (the fewest over the
rounds). This random 12-layer model amplifies float32 rounding: a different thread count or
summation order moves its logits by about 1e-3 of the largest, enough to flip a near tie
within a few greedy steps; ``--dtype float64`` shows what is left of the split's own error.

Memory per rank: the bytes of rank 0's parameters (tied ones once) and of its KV cache after
decoding (storage held, as ``cache.stats()`` measures it), against the one process's.

The N-rank launch also times what tensor parallelism adds per decode step: one gloo
all-reduce of a token's hidden state (two per block, one for the embedding), and the
vocabulary layers for one token: replicated, sharded as cormlm shards them (masked lookup +
all-reduce; local LM head + all-gather), and sharded with DTensor's RowwiseParallel /
ColwiseParallel styles, the same values through torch's own tensor-parallel layer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cormlm.checkpoint.random_weights import write_random_llama

FULL = {"policy": "full"}
CORM = {"policy": "corm", "window": 128, "recent": 128}
SHAPES = {  # bench_decode's random 124.7M Llama-3 shape, and a small one for --quick
    "random": dict(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000),
    "quick": dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512),
}


# ------------------------------------------------------------------ inside each launch
def _parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def _interleaved_us(calls: dict, per_round: int = 20, rounds: int = 15) -> dict[str, float]:
    """Median microseconds per call of each function, timed in alternation (every rank in step:
    the sharded ones are collectives) so that load from other processes weighs on all alike."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            started = time.perf_counter()
            for _ in range(per_round):
                fn()
            times[name].append((time.perf_counter() - started) / per_round * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def _collective_costs(model, vocab_layers: bool) -> dict:
    """Microseconds per call of what the split adds (N ranks only)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    tp, hidden = model.tp, model.config.hidden_size
    x = torch.randn(1, 1, hidden, dtype=model.dtype)
    ids = torch.tensor([[model.config.vocab_size - 1]])
    calls = {"all_reduce": lambda: dist.all_reduce(x.clone(), group=tp.group)}
    if vocab_layers:
        from torch import nn
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        vocab = model.config.vocab_size
        whole = nn.ModuleDict({"embed": nn.Embedding(vocab, hidden), "head": nn.Linear(hidden, vocab, bias=False)})
        whole = whole.to(model.dtype)
        weight, head = whole.embed.weight.detach().clone(), whole.head.weight.detach().clone()
        parallelize_module(whole, tp.mesh, {"embed": RowwiseParallel(input_layouts=Replicate()),
                                            "head": ColwiseParallel(output_layouts=Replicate())})
        def done(y: torch.Tensor) -> torch.Tensor:  # DTensor's collectives are asynchronous: wait for them
            return y.wait() if hasattr(y, "wait") else y

        calls.update({"embed replicated": lambda: F.embedding(ids, weight),
                      "embed cormlm": lambda: model.embed(ids),
                      "embed DTensor": lambda: done(whole.embed(ids)),
                      "head replicated": lambda: F.linear(x, head),
                      "head cormlm": lambda: tp.gather_vocab(model.lm_head(x)),
                      "head DTensor": lambda: done(whole.head(x))})
    return _interleaved_us(calls)


def worker(spec: dict) -> None:
    import cormlm
    from cormlm.parallel import shutdown

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(spec["threads"])
    model = cormlm.load_model(spec["model"], dtype=spec["dtype"], device="cpu", tp=world if world > 1 else None)
    ids = torch.randint(0, model.config.vocab_size, (1, spec["context"]), generator=torch.Generator().manual_seed(0))
    result = {"weights": _parameter_bytes(model), "policies": {}}
    with torch.inference_mode():
        cormlm.generate(model, ids[:, :16], max_new_tokens=4, eos_token_id=[])  # warm-up: kernels, GEMV choices
        logits = model(ids[:, :256])[0, -1]  # the same prompt's logits, against the baseline's
        result["logits"] = (logits / logits.abs().max()).tolist()
        for name, cfg in (("full", FULL), ("corm", CORM)):
            rates = []
            for _ in range(spec["repeats"]):
                out = cormlm.generate(model, ids, max_new_tokens=spec["steps"] + 1, cache=cormlm.CacheConfig(**cfg),
                                      eos_token_id=[])
                rates.append(out.decode_tokens_per_second)
            stats = out.cache.stats()
            result["policies"][name] = {"rates": rates, "kv_bytes": stats.bytes_held,
                                        "kept": stats.retained_fraction,
                                        "tokens": out.tokens[0, spec["context"]:].tolist()}
        if world > 1:
            result["costs"] = _collective_costs(model, spec["vocab_layers"])
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result), flush=True)
    shutdown()


# ------------------------------------------------------------------ the driver
def launch(ranks: int, threads: int, spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               str(Path(__file__).resolve()), "--worker", json.dumps({**spec, "threads": threads})]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"launch of {ranks} rank(s) x {threads} thread(s) failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["load"] = os.getloadavg()[0]
    return result


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per generation")
    parser.add_argument("--repeats", type=int, default=3, help="generations per policy and launch")
    parser.add_argument("--rounds", type=int, default=3, help="launches of each configuration, alternated")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--quick", action="store_true", help="small model, short run, one round")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(json.loads(args.worker))
    from bench_decode import describe_machine

    if args.quick:
        args.context, args.steps, args.repeats, args.rounds = 64, 4, 1, 1
    shape = SHAPES["quick" if args.quick else "random"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per = args.threads_per_rank
    configs = [(1, args.ranks * per), (1, per), (args.ranks, per)]
    labels = [f"1 process x {args.ranks * per} threads (baseline)", f"1 process x {per} thread(s)",
              f"{args.ranks} ranks x {per} thread(s)"]
    with tempfile.TemporaryDirectory() as scratch:
        folder = write_random_llama(Path(scratch) / "model", **shape, qk_scale=4.0)
        spec = {"model": str(folder), "context": args.context, "steps": args.steps, "repeats": args.repeats,
                "vocab_layers": not args.quick, "dtype": args.dtype}
        results: list[list[dict]] = [[] for _ in configs]
        for _ in range(args.rounds):
            for index, (ranks, threads) in enumerate(configs):
                results[index].append(launch(ranks, threads, spec))
    for line in describe_machine():
        print(line)
    print(f"model: random Llama ({', '.join(f'{k} {v}' for k, v in shape.items())}), {args.dtype}; prompt {args.context} "
          f"tokens, {args.steps} greedy decode steps, {args.repeats} repeats x {args.rounds} rounds; CORM w = r = 128")
    print()
    loads = [run["load"] for runs in results for run in runs]
    print(f"1-minute load average after each launch: {min(loads):.1f} to {max(loads):.1f} ({cores} cores)")
    print()
    print("| configuration | policy | decode tok/s | vs baseline | weights MiB per rank | KV MiB per rank | keys kept | "
          "logits vs baseline | greedy tokens = baseline's |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    base, one = {}, results[0][-1]
    for label, runs in zip(labels, results):
        diff = max(abs(a - b) for a, b in zip(runs[-1]["logits"], one["logits"]))
        for policy in ("full", "corm"):
            rate = statistics.median(r for run in runs for r in run["policies"][policy]["rates"])
            base.setdefault(policy, rate)
            last = runs[-1]["policies"][policy]
            same = min(_common_prefix(run["policies"][policy]["tokens"], one["policies"][policy]["tokens"])
                       for run in runs)
            print(f"| {label} | {policy} | {rate:.1f} | {rate / base[policy]:.2f}x | {mib(runs[-1]['weights'])} | "
                  f"{mib(last['kv_bytes'])} | {last['kept']:.0%} | {diff:.1e} | {same} of {args.steps + 1} |")
    split = results[-1][-1]
    print()
    print(f"per rank of {args.ranks}: weights {split['weights'] / one['weights']:.3f} of one process's, KV cache "
          f"(full) {split['policies']['full']['kv_bytes'] / one['policies']['full']['kv_bytes']:.3f}")
    costs = split.get("costs", {})
    if costs:
        print()
        print(f"what the split adds per call, rank 0 (microseconds, median): one all-reduce of a token's hidden state "
              f"{costs['all_reduce']:.0f} (each decode step makes {2 * shape['layers'] + 1}: two per block, one for "
              "the embedding, plus one all-gather of the logits)")
        if "embed DTensor" in costs:
            print()
            print("| vocabulary layer, one token | replicated | sharded (cormlm) | sharded (DTensor styles) |")
            print("|---|---:|---:|---:|")
            for layer in ("embed", "head"):
                print(f"| {layer} | {costs[f'{layer} replicated']:.0f} | {costs[f'{layer} cormlm']:.0f} | "
                      f"{costs[f'{layer} DTensor']:.0f} |")


if __name__ == "__main__":
    main()
