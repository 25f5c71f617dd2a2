"""C kernels built at first use with the machine's own compiler and loaded through ctypes.

PyTorch's CPU build lacks a few kernels a decode step needs (paged attention, matrix-vector
products that stream the weight at the memory's speed). Each is one C file beside the
module that calls it, compiled for the CPU at hand (``-march=native``) into ``<cache
folder>/kernels`` under a name that hashes the source, the compiler, the flags and the CPU,
so a shared home folder never hands one machine's binary to another. OpenMP threads are
torch's own (the same ``libgomp`` is already loaded), so the two never compete. Where no
compiler is found or the build fails, :attr:`Kernel.unavailable` says why and callers keep
their tensor operations.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared")
HEADERS = (Path(__file__).with_name("native_vectors.h"),  # what every kernel may include (-I this folder)
           Path(__file__).with_name("native_tiles.h"))


@functools.cache
def cpu_signature() -> str:
    """The CPU's family, model and flags (what ``-march=native`` and inductor compile for; one
    model name can cover several generations)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()}|{platform.processor()}"
    wanted = [line for line in lines if line.startswith(("model", "cpu family", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(wanted))


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cache_folder() -> Path:
    from .checkpoint.real_model import cache_folder

    return cache_folder() / "kernels"


def build(source: Path, cc: str, flags: tuple[str, ...] = FLAGS, includes: tuple[Path, ...] = ()) -> Path:
    """The shared library for this source (and the sibling sources it ``#include``s), compiler,
    flags and CPU: from the cache, or compiled now (into a temporary name, then renamed:
    concurrent first uses never load a partial file)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    headers = [header.read_text() for header in (*HEADERS, *includes)]
    key = hashlib.sha256("\0".join([source.read_text(), *headers, cc, version, " ".join(flags),
                                    cpu_signature()]).encode()).hexdigest()[:16]
    target = _cache_folder() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        include = f"-I{HEADERS[0].parent}"
        result = subprocess.run([cc, *flags, include, str(source), "-o", str(built), "-lm"], capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


class Kernel:
    """One C function of one source file, built and loaded at its first :meth:`function` call."""

    def __init__(self, source: Path, symbol: str, argtypes: list, includes: tuple[Path, ...] = (),
                 restype: type | None = None) -> None:
        self.source, self.symbol, self.argtypes, self.includes = source, symbol, argtypes, includes
        self.restype = restype
        self.flags = FLAGS
        self.unavailable: list[str] = []  # why it could not be built or loaded (empty: it was, or not tried)
        self._loaded: Callable[..., None] | None = None
        self._tried = False

    def function(self) -> Callable[..., None] | None:
        """The loaded function, or None (the reason in :attr:`unavailable`)."""
        if not self._tried:
            self._tried = True
            self._loaded = self._load()
        return self._loaded

    def reset(self) -> None:
        """Forget the loaded function and the reason (the next call builds and loads again)."""
        self._tried, self._loaded, self.unavailable = False, None, []

    def _load(self) -> Callable[..., None] | None:
        cc = compiler()
        if cc is None:
            self.unavailable.append("no C compiler (cc, gcc or clang) on PATH")
            return None
        try:
            function = getattr(ctypes.CDLL(str(build(self.source, cc, self.flags, self.includes))), self.symbol)
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
            self.unavailable.append(f"could not build or load it: {error}")
            return None
        function.argtypes = self.argtypes
        function.restype = self.restype
        return function


class Workspace:
    """Float32 scratch for a kernel's intermediates, kept per thread between calls (grown, never
    shrunk; a call runs in the thread that made it). A fresh tensor each call comes from fresh
    pages once it is large, and their faults can cost as much as the kernel itself."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, numel: int) -> torch.Tensor:
        """``numel`` elements of this thread's buffer: the caller's until its next ``get``."""
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.numel() < numel:
            buffer = self._local.buffer = torch.empty(numel)
        return buffer[:numel]
