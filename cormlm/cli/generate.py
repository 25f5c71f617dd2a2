"""``cormlm generate``: read the prompt, load the model, stream the completion, summarise.

Streaming decodes the growing completion and prints only what became final text (a
multi-byte character split over tokens waits for its last byte). ``--json`` prints one
object instead: text, ids, timings and per-layer cache stats, for scripts.

Under ``torchrun --nproc-per-node N -m cormlm generate ...`` the model is split over the N
processes (tensor parallelism, ``cormlm.parallel``); rank 0 reads the prompt, prints and
summarises (its cache stats are its own KV heads'), the other ranks stay silent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .common import UsageError, add_cache_arguments, cache_config, human_bytes


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        if args.prompt not in (None, "-"):
            raise UsageError("give the prompt as an argument or with --prompt-file, not both")
        path = Path(args.prompt_file)
        if not path.is_file():
            from ..errors import InputError
            raise InputError(f"prompt file not found: {path}")
        return path.read_text(encoding="utf-8")
    if args.prompt == "-" or (args.prompt is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if args.prompt is None:
        raise UsageError("no prompt: pass it as an argument, with --prompt-file, or on stdin ('-' or a pipe)")
    return args.prompt


def _status(args: argparse.Namespace, message: str, end: str = "\n") -> None:
    if not args.quiet:
        print(message, file=sys.stderr, end=end, flush=True)


def load(args: argparse.Namespace, tp: int | None = None):
    from .. import load_model, load_tokenizer
    from ..checkpoint.embedded import embedded_model_path
    from ..checkpoint.hub import resolve_checkpoint

    source = args.model if args.model is not None else embedded_model_path()
    folder = resolve_checkpoint(source)
    tokenizer = load_tokenizer(folder)
    started = time.perf_counter()

    live = sys.stderr.isatty()  # a counter that rewrites its line; one line per stage in a log

    def progress(done: int, total: int) -> None:
        if live:
            _status(args, f"\rcormlm: loading {source}: {done}/{total} tensors", end="")

    if not live:
        _status(args, f"cormlm: loading {source}")
    model = load_model(folder, dtype=None if args.dtype == "auto" else args.dtype,
                       device=None if args.device == "auto" else args.device, progress=progress, tp=tp)
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    where = f"{model.device}" if tp is None else f"{model.device}, split over {tp} ranks: parameters per rank"
    _status(args, f"{chr(13) if live else ''}cormlm: loaded {source} ({params / 1e6:.1f}M parameters, {model.dtype}, {where}) "
                  f"in {seconds:.1f} s")
    return model, tokenizer, seconds


class Streamer:
    """Writes each step's final text to stdout as tokens arrive. The first ``hold`` tokens wait
    for the next one: with --compile the first decode step compiles or loads its graph and says
    so on stderr, and on a terminal that line then comes before the text, not inside it."""

    def __init__(self, tokenizer, hold: int = 0) -> None:
        self.tokenizer = tokenizer
        self.hold = hold
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        if len(self.ids) > self.hold:
            self.flush()

    def flush(self) -> None:
        """Write what is decoded and not shown yet (a partial character waits for its bytes)."""
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def add_parser(sub) -> None:
    gen = sub.add_parser("generate", help="complete a prompt, streaming tokens to stdout",
                         description="Complete a prompt; tokens stream to stdout, a summary goes to stderr.")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt; '-' (or a pipe) reads stdin")
    gen.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    gen.add_argument("--model", default=None, help="checkpoint folder, .gguf file or hub id (default: the embedded model)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    add_cache_arguments(gen)
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=128)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sampling.add_argument("--top-k", type=int, default=None)
    sampling.add_argument("--top-p", type=float, default=None)
    sampling.add_argument("--seed", type=int, default=None)
    runtime = gen.add_argument_group("runtime")
    runtime.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16", "float64"), default="auto")
    runtime.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    runtime.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    runtime.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    runtime.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")



def run(args: argparse.Namespace) -> None:
    from ..parallel import launched_world_size, shutdown

    world = launched_world_size()
    if world == 1:
        return _run(args, None)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # rank 0 alone reads the prompt, prints and summarises
        args.quiet, args.json = True, False
        sys.stdout = open(os.devnull, "w")  # this process's stdout for its lifetime
    try:
        _run(args, world)
    finally:
        shutdown()


def _run(args: argparse.Namespace, tp: int | None) -> None:
    from .. import generate
    from ..chat import render_chat

    cfg = cache_config(args)  # bad policy flags fail before anything loads
    leader = tp is None or int(os.environ.get("RANK", "0")) == 0
    prompt = read_prompt(args) if leader else ""
    model, tokenizer, load_seconds = load(args, tp)
    if args.chat:
        text = render_chat(tokenizer, [{"role": "user", "content": prompt}])
        ids = tokenizer.encode(text, add_special_tokens=False)  # the template writes its own BOS
    else:
        ids = tokenizer.encode(prompt)
    if model.tp is not None:  # every rank decodes rank 0's prompt
        ids = model.tp.broadcast_object(ids)
    if args.compile:
        from ..compile import compile_model
        compile_model(model, log=lambda message: _status(args, message))
    streamer = None if args.json else Streamer(tokenizer, hold=1 if args.compile else 0)
    out = generate(model, [ids], max_new_tokens=args.max_new_tokens, cache=cfg, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   eos_token_id=tokenizer.eos_token_ids or None, on_tokens=streamer)
    new = out.new_tokens[0]
    stats = out.cache.stats()
    prefill_rate = len(ids) / out.prefill_seconds if out.prefill_seconds > 0 else 0.0
    if args.json:
        print(json.dumps({
            "text": tokenizer.decode(new), "prompt_ids": ids, "new_ids": new,
            "stopped_at_eos": bool(new) and new[-1] in tokenizer.eos_token_ids,
            "timings": {"load_seconds": load_seconds, "prefill_seconds": out.prefill_seconds,
                        "decode_seconds": out.decode_seconds, "prefill_tokens_per_second": prefill_rate,
                        "decode_tokens_per_second": out.decode_tokens_per_second},
            "cache": {"policy": cfg.policy, "window": cfg.window, "recent": cfg.recent, "budget": cfg.budget,
                      "sink": cfg.sink, "threshold": cfg.threshold, "block_size": out.cache.block_size,
                      **stats.as_dict()},
            # under torchrun: the cache above is rank 0's (its KV heads)
            **({} if tp is None else {"tensor_parallel": {"ranks": tp, "cache_of_rank": 0}}),
        }))
        return
    streamer.flush()  # a held first token, when it was the only one
    sys.stdout.write("\n")
    sys.stdout.flush()
    # What was kept and what it holds; no ratio to a full cache, which block granularity makes
    # read like a regression for short prompts where nothing was evicted.
    _status(args, f"[{len(ids)} prompt + {len(new)} new tokens | prefill {prefill_rate:.1f} tok/s, decode "
                  f"{out.decode_tokens_per_second:.1f} tok/s | KV cache ({cfg.policy}): "
                  f"{stats.retained_fraction:.0%} of keys kept, {human_bytes(stats.bytes_held)} held"
                  f"{'' if tp is None else f' by rank 0 of {tp}'}]")

