"""cormlm against transformers on the same checkpoint: prefill and decode speed, peak memory.

    python scripts/bench_decode.py                       # ~100M Llama-3-shaped model, fp32, CPU
    python scripts/bench_decode.py --contexts 1024 --compile

One random-weight checkpoint (scripts/random_checkpoint.py; q/k scaled by ``--peaky`` so
attention is peaked as in trained models) is loaded by both libraries in the same dtype.
Each (implementation, context) runs in its own subprocess, so its peak resident memory
(ru_maxrss) is its own: transformers (SDPA, its dynamic cache), cormlm full and cormlm
corm, eager and (``--compile``) compiled. Prefill: a prompt of ``context`` tokens, median
of ``--repeats``; decode: greedy steps, median tokens/s over ``--repeats`` blocks of
``--steps``. Ratios are to transformers in the same run. Requires transformers (the test
extra).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts.random_checkpoint import write_random_llama  # noqa: E402

IMPLEMENTATIONS = ("transformers", "cormlm-full", "cormlm-corm")


# ----------------------------------------------------------------------------- worker
def _transformers(folder: Path, compiled: bool):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()
    forward = torch.compile(model.forward, dynamic=True) if compiled else model.forward

    def prefill(ids):
        out = forward(input_ids=ids, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    def step(token, state):
        out = forward(input_ids=token, past_key_values=state, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    return prefill, step, lambda state: None


def _cormlm(folder: Path, compiled: bool, policy: str, window: int, recent: int):
    import cormlm
    from cormlm.compile import compile_model

    model = cormlm.load_model(folder, dtype=torch.float32)
    if compiled:
        compile_model(model)
    cfg = cormlm.CacheConfig(policy, window=window, recent=recent)

    def prefill(ids):
        cache = cormlm.make_cache(model, cfg, batch_size=ids.shape[0])
        return model(ids, cache=cache)[:, -1], cache

    def step(token, cache):
        return model(token, cache=cache)[:, -1], cache

    return prefill, step, lambda cache: cache.stats().retained_fraction


@torch.inference_mode()
def worker(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    if args.impl == "transformers":
        prefill, step, retained = _transformers(args.folder, args.compiled)
    else:
        prefill, step, retained = _cormlm(args.folder, args.compiled, args.impl.split("-")[1], args.window,
                                          args.recent)
    ids = torch.randint(0, args.vocab, (1, args.context))
    prefill_times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        logits, state = prefill(ids)
        prefill_times.append(time.perf_counter() - started)
    token = logits.argmax(-1, keepdim=True)
    for _ in range(2):  # warm-up (and, compiled, the decode graph)
        logits, state = step(token, state)
        token = logits.argmax(-1, keepdim=True)
    rates = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        for _ in range(args.steps):
            logits, state = step(token, state)
            token = logits.argmax(-1, keepdim=True)
        rates.append(args.steps / (time.perf_counter() - started))
    recompiles = None
    if args.compiled:
        from torch._dynamo.utils import counters
        recompiles = int(counters["stats"]["unique_graphs"])
    print(json.dumps({"prefill_tps": args.context / statistics.median(prefill_times),
                      "decode_tps": statistics.median(rates), "peak_rss_mib": resource.getrusage(
                          resource.RUSAGE_SELF).ru_maxrss / 1024, "retained": retained(state),
                      "graphs": recompiles}))


# ------------------------------------------------------------------------------ driver
def run_one(folder: Path, impl: str, context: int, compiled: bool, args) -> dict:
    command = [sys.executable, __file__, "--worker", impl, "--folder", str(folder), "--context", str(context),
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--vocab", str(args.vocab),
               "--window", str(args.window), "--recent", str(args.recent)] + (["--compiled"] if compiled else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{impl} at {context} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--peaky", type=float, default=8.0, help="scale of the q/k projections")
    parser.add_argument("--window", type=int, default=256, help="CORM w")
    parser.add_argument("--recent", type=int, default=256, help="CORM r")
    parser.add_argument("--compile", action="store_true", help="also run every implementation compiled")
    # worker mode (internal)
    parser.add_argument("--worker", default=None, choices=IMPLEMENTATIONS, dest="impl")
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--context", type=int)
    parser.add_argument("--compiled", action="store_true")
    args = parser.parse_args()
    if args.impl:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_llama(Path(tmp), hidden=args.hidden, layers=args.layers, heads=args.heads,
                                    kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab,
                                    max_positions=max(args.contexts) + 64, qk_scale=args.peaky)
        params = sum(v.numel() for v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            folder / "model.safetensors").values())
        print(f"model: {params / 1e6:.1f}M parameters, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
              f"fp32, {torch.get_num_threads()} threads; corm w={args.window} r={args.recent}", flush=True)
        print("| context | mode | implementation | retained | prefill tok/s | vs transformers | decode tok/s | "
              "vs transformers | peak RSS MiB |\n|---:|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
        for context in args.contexts:
            for compiled in ([False, True] if args.compile else [False]):
                mode = "compiled" if compiled else "eager"
                base = None
                for impl in IMPLEMENTATIONS:
                    r = run_one(folder, impl, context, compiled, args)
                    base = base or r
                    retained = "-" if r["retained"] is None else f"{r['retained']:.1%}"
                    graphs = f" ({r['graphs']} graphs)" if r["graphs"] is not None else ""
                    print(f"| {context} | {mode}{graphs} | {impl} | {retained} | {r['prefill_tps']:.0f} | "
                          f"{r['prefill_tps'] / base['prefill_tps']:.2f}x | {r['decode_tps']:.2f} | "
                          f"{r['decode_tps'] / base['decode_tps']:.2f}x | {r['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
