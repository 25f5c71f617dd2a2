"""Running one of scripts/ as a user would: ``python scripts/NAME.py ARGS`` from the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: object, timeout: float = 300, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    """The finished run (output captured as text); the caller checks its return code."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
