"""``cormlm generate``: load a checkpoint, stream a completion, summarise the cache.

A first version: the embedded default model, chat templates and --json arrive with the
CLI issue; until then ``--model`` is required.
"""

from __future__ import annotations

import argparse
import sys

from .errors import CormlmError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cormlm", description="LLM inference with a ragged, evicting KV cache")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt")
    gen.add_argument("prompt", nargs="?", default="-", help="the prompt; '-' or omitted reads stdin")
    gen.add_argument("--model", required=True, help="checkpoint folder or hub id")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--policy", default="full", help="cache policy")
    gen.add_argument("--dtype", default="auto", help="auto|float32|bfloat16|float16")
    gen.add_argument("--device", default="auto", help="auto|cpu|cuda")
    return parser


def _generate(args: argparse.Namespace) -> None:
    import torch

    from . import CacheConfig, generate, load_model, load_tokenizer

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    ids = torch.tensor([tokenizer.encode(prompt)])
    printed: list[int] = []
    shown = ""

    def stream(token: torch.Tensor) -> None:
        nonlocal shown
        printed.append(int(token[0]))
        text = tokenizer.decode(printed)
        if not text.endswith("\ufffd"):  # wait for a multi-byte character to complete
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    out = generate(model, ids, max_new_tokens=args.max_new_tokens, cache=CacheConfig(args.policy),
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   eos_token_id=tokenizer.eos_token_ids or None, on_tokens=stream)
    sys.stdout.write("\n")
    stats = out.cache.stats()
    print(f"[{ids.shape[1]} prompt + {len(out.new_tokens[0])} new tokens | "
          f"prefill {ids.shape[1] / max(out.prefill_seconds, 1e-9):.1f} tok/s, "
          f"decode {out.decode_tokens_per_second:.1f} tok/s | KV cache {stats.bytes_held} B held, "
          f"full {stats.bytes_full} B, ratio {stats.compression_ratio:.2f}]", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _generate(args)
    except CormlmError as exc:
        print(f"cormlm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncormlm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
