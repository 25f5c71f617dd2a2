"""``cormlm serve``: an OpenAI-compatible server (FastAPI + uvicorn, the ``serve`` extra) over
the continuous-batching engine in ``cormlm.serve``: one decode step for every running
request, requests admitted while their prompt's KV fits ``--kv-memory``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import add_cache_arguments, byte_size, cache_config, human_bytes


def add_parser(sub) -> None:
    srv = sub.add_parser("serve", help="an OpenAI-compatible server with continuous batching",
                         description="Serve /v1/completions and /v1/chat/completions (streaming too), /v1/models, "
                                     "/health and /metrics, batching every running request's decode steps.")
    srv.add_argument("--model", default=None, help="checkpoint folder, .gguf file or hub id (default: the embedded model)")
    srv.add_argument("--model-name", default=None,
                     help="the name clients give as 'model' (default: the folder or file name, or the hub id)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    add_cache_arguments(srv)
    batching = srv.add_argument_group("batching")
    batching.add_argument("--kv-memory", type=byte_size, default="2GiB",
                          help="KV cache memory budget for all requests together, e.g. 512MiB, 2GiB (default 2GiB)")
    batching.add_argument("--max-batch", type=int, default=32, help="most requests decoding at once (default 32)")
    batching.add_argument("--max-queue", type=int, default=128,
                          help="most requests waiting for admission; more get HTTP 429 (default 128)")
    runtime = srv.add_argument_group("runtime")
    runtime.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16", "float64"), default="auto")
    runtime.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    runtime.add_argument("--pack-weights", action="store_true",
                         help="oneDNN-packed weights (CPU, cormlm.pack_weights): faster batched products on "
                              "machines where oneDNN's blocked layout beats the measured plain kernels, slower for one "
                              "request; measure with scripts/bench_decode.py --pack-weights")
    runtime.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="warning",
                         help="uvicorn's log level (default warning)")


def _model_name(source: str | None) -> str:
    if source is None:
        return "cormlm-embedded"
    path = Path(source)
    return path.name.removesuffix(".gguf") if path.exists() else source


def run(args: argparse.Namespace) -> None:
    from .common import UsageError

    cfg = cache_config(args)  # bad flags fail before anything loads
    from ..parallel import launched_world_size

    if launched_world_size() > 1:
        raise UsageError("cormlm serve runs in one process: tensor parallelism (torchrun) is for generate and the "
                         "Python API; start cormlm serve without torchrun")
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    from ..serve.app import check_port, serve  # a missing 'serve' extra is one line, before the model loads

    check_port(args.host, args.port)
    from .. import load_model, load_tokenizer
    from ..checkpoint.embedded import embedded_model_path
    from ..checkpoint.hub import resolve_checkpoint
    from ..serve.scheduler import Engine

    source = args.model if args.model is not None else embedded_model_path()
    started = time.perf_counter()
    folder = resolve_checkpoint(source)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, dtype=None if args.dtype == "auto" else args.dtype,
                       device=None if args.device == "auto" else args.device)
    if args.pack_weights:
        from ..pack import pack_weights

        pack_weights(model)
    engine = Engine(model, tokenizer, cfg, args.kv_memory, max_batch=args.max_batch, max_queue=args.max_queue,
                    stop_ids=tokenizer.eos_token_ids or None)
    name = args.model_name or _model_name(args.model)
    print(f"cormlm: serving {name} ({source}, loaded in {time.perf_counter() - started:.1f} s) on "
          f"http://{args.host}:{args.port}/v1 | policy {cfg.policy}, KV memory {human_bytes(args.kv_memory)}, "
          f"up to {args.max_batch} requests at once", file=sys.stderr, flush=True)
    serve(engine, tokenizer, name, args.host, args.port, args.log_level)
