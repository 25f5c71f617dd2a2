"""A completion's text as tokens arrive, with stop strings.

Streaming may only send text that is final: not the tail of a character whose bytes are
split over tokens (it decodes as U+FFFD until its last byte comes), and not a tail that
could still grow into a stop string (a stop string is never sent, nor anything after it).
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, cut before the first stop string once one is found
        self.stopped = False  # a stop string was found

    def push(self, token: int) -> str:
        """Add a token; return the text that is final so far (from the start, not a delta)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self.text
        self.text = text
        end = len(text.rstrip(REPLACEMENT))
        return text[:end - self._held_back(text[:end])]

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        return max((k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
