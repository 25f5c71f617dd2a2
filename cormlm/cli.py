"""The ``cormlm`` command: ``generate`` (stream a completion) and ``inspect`` (what a
checkpoint costs before a long run).

Exit codes: 0 done; 1 the run failed on its input (missing model, unreachable hub, prompt
over the context, corrupt checkpoint); 2 usage (bad flags or combinations); 130 Ctrl-C
(what was printed stays printed).
"""

from __future__ import annotations

import argparse
import re
import sys

from .errors import CacheConfigError, CormlmError

POLICIES = ("full", "corm", "streaming", "h2o", "scissorhands", "knorm")
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(Exception):
    """A flag or combination of flags the command cannot run with."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line, not the whole usage block
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _budget(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a number of tokens (512) nor a fraction (0.3)") from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cormlm", description="LLM inference with a ragged, evicting KV cache (CORM)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="complete a prompt, streaming tokens to stdout",
                         description="Complete a prompt; tokens stream to stdout, a summary goes to stderr.")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt; '-' (or a pipe) reads stdin")
    gen.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    gen.add_argument("--model", default=None, help="checkpoint folder, .gguf file or hub id (default: the embedded model)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    cache = gen.add_argument_group("cache policy")
    cache.add_argument("--policy", choices=POLICIES, default="corm", help="eviction policy (default corm)")
    cache.add_argument("--window", type=int, default=None, help="corm: w (256); scissorhands: history (32)")
    cache.add_argument("--recent", type=int, default=None,
                       help="positions never evicted (corm 256; budget policies: half the budget)")
    cache.add_argument("--budget", type=_budget, default=None,
                       help="h2o/scissorhands/knorm/streaming: tokens kept per KV head (int) or fraction (float)")
    cache.add_argument("--sink", type=int, default=None, help="streaming: first positions always kept (4)")
    cache.add_argument("--block-size", type=int, default=16, help="cache slots per storage block")
    cache.add_argument("--prefill-chunk", type=int, default=None, help="prefill long prompts in chunks, evicting")
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=128)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sampling.add_argument("--top-k", type=int, default=None)
    sampling.add_argument("--top-p", type=float, default=None)
    sampling.add_argument("--seed", type=int, default=None)
    run = gen.add_argument_group("runtime")
    run.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16", "float64"), default="auto")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    run.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")

    ins = sub.add_parser("inspect", help="family, size, heads and KV bytes per token of a checkpoint",
                         description="What a checkpoint costs, read from its config and tensor headers.")
    ins.add_argument("model", nargs="?", default=None, help="checkpoint folder, .gguf file or hub id (default: embedded)")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "generate":
            from .cli_generate import run_generate
            run_generate(args)
        else:
            from .cli_inspect import run_inspect
            run_inspect(args)
    except (UsageError, CacheConfigError) as exc:  # CacheConfig's fields are flags here
        message = re.sub(r"CacheConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(exc))
        print(f"cormlm: usage error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except CormlmError as exc:
        print(f"cormlm: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\ncormlm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
