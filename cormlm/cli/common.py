"""What every ``cormlm`` command shares: one-line usage errors, the budget flag's type, byte sizes."""

from __future__ import annotations

import argparse


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
