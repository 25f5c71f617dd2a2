"""Turning a user's "model" argument into a local checkpoint folder.

A path that exists is used as is; something that looks like a path but does not exist is
an error (never silently sent to the hub); anything else is a hub id fetched with
``huggingface_hub.snapshot_download``, which reuses the local cache and honours offline mode.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointNotFoundError, HubError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~", ".\\")) or "\\" in text or text.count("/") > 1
            or text in (".", ".."))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(model: str | os.PathLike, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder holding the checkpoint named by ``model`` (folder or hub id)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointNotFoundError(f"{path} is a file; pass the folder that holds config.json")
    text = str(model)
    if _looks_like_path(text) or not REPO_ID.match(text):
        raise CheckpointNotFoundError(f"no such folder: {text}; pass a checkpoint folder or a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        folder = snapshot_download(text, revision=revision, cache_dir=cache_dir,
                                   allow_patterns=CHECKPOINT_PATTERNS, local_files_only=offline)
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        why = "offline mode (HF_HUB_OFFLINE) and it is not in the local cache" if offline else str(exc).splitlines()[0]
        raise HubError(
            f"'{text}' is not a local folder and could not be fetched from the Hugging Face hub ({why}); "
            "pass a local folder with config.json and *.safetensors, or check the id, network and HF_TOKEN"
        ) from None
    return Path(folder)
