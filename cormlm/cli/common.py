"""What every ``cormlm`` command shares: one-line usage errors, the budget flag's type, byte sizes."""

from __future__ import annotations

import argparse
import re


class UsageError(Exception):
    """A flag or combination of flags the command cannot run with."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line, not the whole usage block
        raise UsageError(f"{message} (see '{self.prog} --help')")


def flag(field: str) -> str:
    """The command-line spelling of a CacheConfig field."""
    return "--" + field.replace("_", "-")


def policy_help(parameter: str) -> str:
    """What ``parameter`` means to each policy that reads it, from the policies themselves."""
    from ..cache.registry import available_policies, policy_class

    meanings: dict[str, list[str]] = {}  # meaning -> policies (the budget policies share theirs)
    for name in available_policies():
        cls = policy_class(name)
        if parameter in cls.parameters:
            meanings.setdefault(cls.help.get(parameter, ""), []).append(name)
    return "; ".join(f"{', '.join(names)}: {meaning}" if meaning else ", ".join(names)
                     for meaning, names in meanings.items())


def budget(text: str) -> int | float:
    """``--budget``: a number of tokens (int) or a fraction of the tokens seen (float)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a number of tokens (512) nor a fraction (0.3)") from None


def human_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def byte_size(text: str) -> int:
    """A memory size: plain bytes (1048576) or a number with a unit (512MiB, 2GiB, 1.5GB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in BYTE_UNITS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a memory size; give bytes or a number with a unit "
                                         "(512MiB, 2GiB, 1.5GB)")
    size = int(float(match.group(1)) * BYTE_UNITS[unit])
    if size < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is no memory at all; give a positive size")
    return size


POLICY_FLAGS = (("window", int), ("recent", int), ("budget", budget), ("sink", int), ("threshold", float),
                ("magnitude", float))


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """The cache policy flags (the fields of CacheConfig), as one argument group."""
    from ..cache import available_policies

    cache = parser.add_argument_group("cache policy")
    cache.add_argument("--policy", choices=available_policies(), default="corm", help="eviction policy (default corm)")
    for name, kind in POLICY_FLAGS:
        cache.add_argument(flag(name), type=kind, default=None, help=policy_help(name))
    cache.add_argument("--block-size", type=int, default=None,
                       help="cache slots per storage block (default: 64 for the full cache, 16 for evicting policies)")
    cache.add_argument("--prefill-chunk", type=int, default=None, help="prefill long prompts in chunks, evicting")


def cache_config(args: argparse.Namespace):
    """The CacheConfig the flags of :func:`add_cache_arguments` ask for (CacheConfigError if invalid)."""
    from ..cache import CacheConfig

    return CacheConfig(args.policy, **{name: getattr(args, name) for name, _ in POLICY_FLAGS},
                       block_size=args.block_size, prefill_chunk=args.prefill_chunk)
