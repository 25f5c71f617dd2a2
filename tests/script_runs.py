"""Running one of scripts/ as a user would: ``python scripts/NAME.py ARGS`` from the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model_name() -> str | None:
    """/proc/cpuinfo's model name, which a benchmark's header must name (None where unreadable)."""
    return _cpuinfo_field("model name")


def cpu_family() -> str | None:
    """/proc/cpuinfo's CPU family (one model name covers several generations; None where absent)."""
    return _cpuinfo_field("cpu family")


def run_script(name: str, *args: object, timeout: float = 300, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    """The finished run (output captured as text); the caller checks its return code."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def table_rows(output: str, columns: list[str]) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``output`` whose header is ``columns``, as dicts."""
    lines = output.splitlines()
    header = next(line for line in lines if line.startswith(f"| {columns[0]} |"))
    assert [c.strip() for c in header.strip("|").split("|")] == columns
    rows = []
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(columns), line
        rows.append(dict(zip(columns, cells)))
    return rows


def cpu_line(output: str) -> str:
    """A benchmark's "- CPU: " header line, checked to name this machine's CPU model."""
    cpu = next(line for line in output.splitlines() if line.startswith("- CPU: "))
    name = cpu_model_name()
    assert name is None or name in cpu
    return cpu
