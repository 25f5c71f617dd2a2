"""Where the embedded default model lives: weights/ beside the package (a source checkout
or an editable install), or wherever ``CORMLM_WEIGHTS`` points."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointNotFoundError


def embedded_model_path() -> Path:
    configured = os.environ.get("CORMLM_WEIGHTS")
    folder = Path(configured) if configured else Path(__file__).resolve().parents[2] / "weights"
    if not (folder / "config.json").is_file():
        raise CheckpointNotFoundError(
            f"the embedded default model is not at {folder} (install cormlm from its source checkout, "
            f"set CORMLM_WEIGHTS, or pass --model FOLDER_OR_HUB_ID)")
    return folder
