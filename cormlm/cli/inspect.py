"""``cormlm inspect MODEL``: what a checkpoint costs, without loading its weights.

Parameters are counted from the tensor headers (safetensors or GGUF; shapes only); KV bytes per token are
what a full cache stores for one token in every layer, in the checkpoint's dtype.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from .common import human_bytes


def describe(source) -> dict:
    from ..checkpoint.hub import resolve_checkpoint
    from ..checkpoint.load import open_checkpoint

    folder = resolve_checkpoint(source)
    config, tensors = open_checkpoint(folder)
    try:
        params = sum(math.prod(tensors.shape(name)) for name in tensors.names())
    finally:
        tensors.close()
    dtype = getattr(torch, config.stored_dtype or "float32", torch.float32)
    itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else 4
    stored = str(dtype).removeprefix("torch.")
    if getattr(tensors, "file_type", None):  # a quantized GGUF: runs dequantized (float32 on CPU)
        stored = f"{tensors.file_type} (GGUF; KV bytes below for float32)"
    per_token = config.kv_bytes_per_token(itemsize)
    attention = ("MHA" if config.num_kv_heads == config.num_heads else
                 "MQA" if config.num_kv_heads == 1 else f"GQA ({config.group_size} query heads per KV head)")
    return {
        "model": str(source), "folder": str(folder), "family": config.family, "parameters": params,
        "layers": config.num_layers, "hidden_size": config.hidden_size, "heads": config.num_heads,
        "kv_heads": config.num_kv_heads, "head_dim": config.head_dim, "attention": attention,
        "position": config.position, "vocab_size": config.vocab_size, "context_length": config.context_length,
        "sliding_window": config.sliding_window, "dtype": stored,
        "kv_bytes_per_token": per_token, "kv_bytes_full_context": per_token * config.context_length,
    }


def add_parser(sub) -> None:
    ins = sub.add_parser("inspect", help="family, size, heads and KV bytes per token of a checkpoint",
                         description="What a checkpoint costs, read from its config and tensor headers.")
    ins.add_argument("model", nargs="?", default=None, help="checkpoint folder, .gguf file or hub id (default: embedded)")
    ins.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> None:
    from ..checkpoint.embedded import embedded_model_path

    info = describe(args.model if args.model is not None else embedded_model_path())
    if args.json:
        print(json.dumps(info))
        return
    rows = [("model", info["model"]), ("family", info["family"]),
            ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)"),
            ("layers", info["layers"]), ("hidden size", info["hidden_size"]),
            ("heads / KV heads", f"{info['heads']} / {info['kv_heads']}: {info['attention']}"),
            ("head dim", info["head_dim"]), ("positions", info["position"]), ("vocab", info["vocab_size"]),
            ("context length", f"{info['context_length']:,}" + (f" (sliding window {info['sliding_window']})"
                                                                if info["sliding_window"] else "")),
            ("dtype", info["dtype"]),
            ("KV bytes per token", f"{info['kv_bytes_per_token']:,} ({human_bytes(info['kv_bytes_per_token'])})"),
            ("KV bytes, full context", human_bytes(info["kv_bytes_full_context"]) + " per sequence, full cache")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
