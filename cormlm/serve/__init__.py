"""``cormlm serve``: an OpenAI-compatible HTTP server over a continuous-batching engine.

``scheduler`` is the engine (torch only, no web code); ``protocol``, ``app`` and
``metrics`` are the HTTP side, which needs the ``serve`` extra (FastAPI and uvicorn):
only they import it, so the rest of cormlm never does.
"""

from ..errors import CormlmError


class ServeExtraMissing(CormlmError):
    """FastAPI or uvicorn is not installed: ``pip install 'cormlm[serve]'``."""
