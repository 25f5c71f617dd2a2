"""Reading the JSON files of a checkpoint folder with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError


def read_json(path: Path) -> dict[str, Any]:
    """Parse ``path`` as a JSON object; corrupt or non-object content is a CheckpointError."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text ({exc}); re-download or re-save the file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "re-download or re-save the file"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_optional_json(path: Path) -> dict[str, Any]:
    """Like :func:`read_json`, but a missing file reads as an empty object."""
    return read_json(path) if path.is_file() else {}
