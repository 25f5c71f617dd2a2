"""Errors a user can act on.

Every error cormlm raises on bad input derives from :class:`CormlmError` and says what is
wrong and what to do, so that callers never have to read a traceback from inside torch.
They also derive from the builtin that fits (ValueError, FileNotFoundError) so generic
handlers keep working.
"""

from __future__ import annotations

from collections.abc import Callable


class CormlmError(Exception):
    """Base class of every error cormlm raises on bad input."""


class CheckpointError(CormlmError, ValueError):
    """A checkpoint folder is incomplete or corrupt (files, tensors, shapes)."""


class CheckpointNotFoundError(CormlmError, FileNotFoundError):
    """A local folder or file that should hold a checkpoint does not exist."""


class ConfigError(CormlmError, ValueError):
    """config.json (or a related JSON file) holds values cormlm cannot use."""


class UnsupportedModelError(ConfigError):
    """The checkpoint's architecture is not one cormlm implements."""


class HubError(CormlmError, OSError):
    """A hub id could not be resolved (offline, unreachable, unknown repo)."""


class InputError(CormlmError, ValueError):
    """Token ids, masks or prompt lengths that the model cannot accept."""


class CacheConfigError(CormlmError, ValueError):
    """Invalid cache policy or policy parameters.

    The message is a template in which ``{name}`` stands for each CacheConfig field at
    fault (``parameters``), so every front end names a field its own way: Python callers
    read ``CacheConfig.window``, the command line ``--window`` (:meth:`render`).
    """

    def __init__(self, template: str, *parameters: str) -> None:
        self.template = template
        self.parameters = parameters
        super().__init__(self.render(lambda name: f"CacheConfig.{name}"))

    def render(self, spell: Callable[[str], str]) -> str:
        message = self.template
        for name in self.parameters:  # plain replacement: user values in the message need no escaping
            message = message.replace("{" + name + "}", spell(name))
        return message
