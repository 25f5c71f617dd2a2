"""Turning a user's "model" argument into a local checkpoint folder.

A path that exists is used as is; something that looks like a path but does not exist is
an error (never silently sent to the hub); anything else is a hub id fetched with
``huggingface_hub.snapshot_download``, which reuses the local cache and honours offline mode.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointNotFoundError, HubError

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~", ".\\")) or "\\" in text or text.count("/") > 1
            or text in (".", ".."))


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _gguf_in_folder(folder: Path) -> Path | None:
    if (folder / "config.json").is_file():
        return None
    found = sorted(folder.glob("*.gguf"))
    if len(found) > 1:
        raise CheckpointNotFoundError(f"{folder} holds several GGUF files ({', '.join(p.name for p in found)}); "
                                      "pass the one to load")
    return found[0] if found else None


def resolve_checkpoint(model: str | os.PathLike, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """The local checkpoint named by ``model``: a Hugging Face folder, or a GGUF file.

    A folder without config.json that holds exactly one ``.gguf`` file resolves to that file.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return _gguf_in_folder(path) or path
    if path.exists():
        if path.suffix.lower() == ".gguf":
            return path
        raise CheckpointNotFoundError(f"{path} is a file; pass the folder that holds config.json, or a .gguf file")
    text = str(model)
    if _looks_like_path(text) or not _is_repo_id(text):
        raise CheckpointNotFoundError(f"no such folder: {text}; pass a checkpoint folder or a hub id like 'org/name'")
    from huggingface_hub import constants, snapshot_download

    offline = constants.HF_HUB_OFFLINE
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
