"""The ``cormlm`` command: ``generate`` (stream a completion) and ``inspect`` (what a
checkpoint costs before a long run); one module per command.

Exit codes: 0 done; 1 the run failed on its input (missing model, unreachable hub, prompt
over the context, corrupt checkpoint); 2 usage (bad flags or combinations); 130 Ctrl-C
(what was printed stays printed).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import CacheConfigError, CormlmError
from . import generate, inspect, serve
from .common import Parser, UsageError, flag

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
COMMANDS = {"generate": generate, "inspect": inspect, "serve": serve}


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cormlm", description="LLM inference with a ragged, evicting KV cache (CORM)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def _rank_tag() -> str:
    """' (rank N)' in a process torchrun started among several, else nothing."""
    import os

    return f" (rank {os.environ['RANK']})" if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else ""


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        COMMANDS[args.command].run(args)
    except CacheConfigError as exc:  # CacheConfig's fields are flags here
        print(f"cormlm: usage error: {exc.render(flag)}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"cormlm: usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CormlmError as exc:
        print(f"cormlm{_rank_tag()}: error: {exc}", file=sys.stderr)
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
