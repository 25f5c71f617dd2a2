"""cormlm against transformers on the same checkpoint, in one process: prefill and decode
speed, peak memory, compile graphs.

    python scripts/bench_decode.py                            # 1k and 4k, eager and compiled
    python scripts/bench_decode.py --contexts 16384 --repeats 3 --no-compile

One random-weight ~125M Llama-3-shaped checkpoint (scripts/random_checkpoint.py; q/k
scaled by ``--peaky`` so attention is peaked as in trained models) is loaded by both
libraries in the same dtype and process. For each context, each repeat runs every
implementation in turn (transformers with SDPA and its dynamic cache, cormlm with a full
cache, cormlm with CORM): a prefill of ``context`` tokens, two warm-up decode steps, then
``--steps`` greedy decode steps. Figures are medians over ``--repeats`` and ratios are to
transformers measured in the same run. Peak memory is the resident-set high-water mark of
one extra prefill + decode per implementation (after a short warm-up run), above the
resident set before it (Linux ``/proc/self/clear_refs``). Compiled: transformers' forward under ``torch.compile
(dynamic=True)``, cormlm through ``cormlm.compile_model``; the number of dynamo
graphs each built, and how many of those appeared during timed decoding (recompilations
as caches grow or shrink), are printed. "Of bandwidth limit": decode tokens/s times the
bytes a step must read (weights but the embedding, plus the KV cache held) over the read
bandwidth measured in the same run (a reduction over 1 GiB). ``--device cuda --dtype
bfloat16`` runs the same comparison on a GPU. Requires transformers (the test extra).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts.random_checkpoint import write_random_llama  # noqa: E402

IMPLEMENTATIONS = ("transformers", "cormlm-full", "cormlm-corm")


# ------------------------------------------------------------------------ memory
def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> int | None:
    """Forget the high-water mark; return the current resident set (KiB), None off Linux."""
    gc.collect()
    _malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def graphs_built() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


# ----------------------------------------------------------------- implementations
@dataclass
class Runner:
    """One implementation: prefill(ids) -> (logits, state); step(token, state) -> (logits, state)."""

    name: str
    prefill: Callable[[torch.Tensor], tuple[torch.Tensor, Any]]
    step: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]
    retained: Callable[[Any], float | None] = lambda state: None
    kv_bytes: Callable[[Any], int] = lambda state: 0
    results: dict[str, list[float]] = field(default_factory=dict)


def transformers_runner(model, compiled: bool) -> Runner:
    forward = torch.compile(model.forward, dynamic=True) if compiled else model.forward

    def prefill(ids):
        out = forward(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    def step(token, state):
        out = forward(input_ids=token, past_key_values=state, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    def kv_bytes(state) -> int:
        return sum(t.untyped_storage().nbytes() for layer in state.layers for t in (layer.keys, layer.values))

    return Runner("transformers", prefill, step, kv_bytes=kv_bytes)


def cormlm_runner(model, policy: str, window: int, recent: int) -> Runner:
    import cormlm

    cfg = cormlm.CacheConfig(policy, window=window, recent=recent) if policy == "corm" else cormlm.CacheConfig(policy)

    def prefill(ids):
        cache = cormlm.make_cache(model, cfg, batch_size=ids.shape[0])
        return model(ids, cache=cache, last_logits_only=True)[:, -1], cache

    def step(token, cache):
        return model(token, cache=cache)[:, -1], cache

    return Runner(f"cormlm-{policy}", prefill, step, retained=lambda c: c.stats().retained_fraction,
                  kv_bytes=lambda c: c.stats().bytes_held)


# -------------------------------------------------------------------- measuring
def decode(runner: Runner, logits: torch.Tensor, state, steps: int) -> tuple[torch.Tensor, Any]:
    token = logits.argmax(-1, keepdim=True)
    for _ in range(steps):
        logits, state = runner.step(token, state)
        token = logits.argmax(-1, keepdim=True)
    return logits, state


def measure_memory(runner: Runner, ids: torch.Tensor, steps: int) -> float | None:
    """Peak MiB above the start over one prefill + decode (state freed afterwards): device
    memory on CUDA, the resident set on CPU."""
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() / 1024
    else:
        start = reset_peak_rss()
    logits, state = runner.prefill(ids)
    decode(runner, logits, state, steps)
    peak = torch.cuda.max_memory_allocated() / 1024 if cuda else _status_kib("VmHWM")
    del logits, state
    return None if start is None or peak is None else (peak - start) / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def read_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Bytes/s the device streams through a reduction over ``gib`` GiB (median of 5)."""
    data = torch.ones(int(gib * 2**30) // 4, device=device)
    times = []
    for _ in range(6):
        sync(device)
        started = time.perf_counter()
        data.sum()
        sync(device)
        times.append(time.perf_counter() - started)
    return data.numel() * 4 / statistics.median(times[1:])


def timed_repeat(runner: Runner, ids: torch.Tensor, steps: int) -> None:
    record = runner.results.setdefault
    sync(ids.device)
    started = time.perf_counter()
    logits, state = runner.prefill(ids)
    sync(ids.device)
    record("prefill_tps", []).append(ids.numel() / (time.perf_counter() - started))
    logits, state = decode(runner, logits, state, 2)  # warm-up (compiled: the decode graphs)
    graphs = graphs_built()
    sync(ids.device)
    started = time.perf_counter()
    logits, state = decode(runner, logits, state, steps)
    sync(ids.device)
    record("decode_tps", []).append(steps * ids.shape[0] / (time.perf_counter() - started))
    record("decode_recompiles", []).append(graphs_built() - graphs)
    record("retained", []).append(runner.retained(state))
    record("kv_mib", []).append(runner.kv_bytes(state) / 2**20)


def run_context(runners: list[Runner], context: int, args, mode: str, weight_bytes: int,
                bandwidth: float) -> None:
    torch.manual_seed(context)
    ids = torch.randint(0, args.vocab, (args.batch, context)).to(args.device)
    graphs_before = {}
    for runner in runners:  # warm-up (compiled: builds the graphs), then the memory pass
        runner.results = {}
        before = graphs_built()
        decode(runner, *runner.prefill(ids[:, :64]), 2)
        runner.results["peak_mib"] = [measure_memory(runner, ids, args.steps)]
        graphs_before[runner.name] = graphs_built() - before
    for repeat in range(args.repeats):
        for runner in runners:
            print(f"  [{mode} {context}] repeat {repeat + 1}/{args.repeats}: {runner.name}", file=sys.stderr, flush=True)
            timed_repeat(runner, ids, args.steps)
    base = runners[0].results
    for runner in runners:
        r = {key: statistics.median(v) if None not in v else None for key, v in runner.results.items()}
        b = {key: statistics.median(v) if None not in v else None for key, v in base.items()}
        graphs = ""
        if mode == "compiled":
            graphs = f"{graphs_before[runner.name]} / {max(runner.results['decode_recompiles'])}"
        retained = "-" if r["retained"] is None else f"{r['retained']:.1%}"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        # bytes a decode step (all rows) must read at least: the weights + the KV held
        roofline = r["decode_tps"] / args.batch * (weight_bytes + r["kv_mib"] * 2**20) / bandwidth
        print(f"| {context} | {mode} | {runner.name} | {retained} | {r['kv_mib']:.1f} | {peak} | "
              f"{r['prefill_tps']:.0f} | {r['prefill_tps'] / b['prefill_tps']:.2f}x | {r['decode_tps']:.2f} | "
              f"{r['decode_tps'] / b['decode_tps']:.2f}x | {roofline:.0%} | {graphs or '-'} |", flush=True)


# -------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per repeat")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together (tokens/s count all rows)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
                        help="implementations to run; ratios are to the first")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--compile-only", action="store_true", help="compiled only")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--peaky", type=float, default=8.0, help="scale of the q/k projections")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--window", type=int, default=256, help="CORM w")
    parser.add_argument("--recent", type=int, default=256, help="CORM r")
    args = parser.parse_args()
    if args.no_compile and args.compile_only:
        parser.error("--no-compile and --compile-only exclude each other")
    modes = ["eager"] * (not args.compile_only) + ["compiled"] * (not args.no_compile)

    import cormlm
    from cormlm.compile import compile_model

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        folder = write_random_llama(Path(tmp), hidden=args.hidden, layers=args.layers, heads=args.heads,
                                    kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab,
                                    max_positions=max(args.contexts) + args.steps + 64, qk_scale=args.peaky)
        dtype = getattr(torch, args.dtype)
        model = cormlm.load_model(folder, dtype=dtype, device=args.device)
        params = sum(p.numel() for p in model.parameters())
        # every parameter is read once per decode step except the embedding (one row)
        weight_bytes = (params - (0 if model.config.tie_word_embeddings else model.embed.weight.numel())) \
            * dtype.itemsize
        bandwidth = read_bandwidth(torch.device(args.device))
        hf_model = None
        if "transformers" in args.impls:
            import transformers
            transformers.logging.set_verbosity_error()
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, attn_implementation="sdpa").to(args.device).eval()
        where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                 else f"CPU, {torch.get_num_threads()} threads")
        print(f"model: {params / 1e6:.1f}M parameters, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
              f"{args.dtype}, batch {args.batch}, {where}, torch {torch.__version__}; measured read bandwidth "
              f"{bandwidth / 1e9:.1f} GB/s; corm w={args.window} r={args.recent}; medians of {args.repeats} "
              f"repeats, {args.steps} decode steps each")
        print("| context | mode | implementation | retained | KV MiB | peak MiB | prefill tok/s | vs first | "
              "decode tok/s | vs first | of bandwidth limit | graphs built / during decode |\n"
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
        for mode in modes:
            if mode == "compiled":
                compile_model(model)
            runners = []
            for name in args.impls:
                if name == "transformers":
                    runners.append(transformers_runner(hf_model, mode == "compiled"))
                else:
                    runners.append(cormlm_runner(model, name.split("-")[1], args.window, args.recent))
            for context in args.contexts:
                run_context(runners, context, args, mode, weight_bytes, bandwidth)


if __name__ == "__main__":
    from cormlm.errors import CormlmError

    try:
        main()
    except CormlmError as error:  # bad device, dtype or model: one line, not a traceback
        raise SystemExit(f"bench_decode: {error}")
