"""Saved decode steps (cormlm.compile_cache): a later run loads the step compiled by an earlier
one and decodes exactly what eager decodes; what the saved step's guards refuse, or a damaged
file, takes torch.compile's path; the file's key separates what the guards cannot see."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cache_cases import random_prompt
from checkpoints import make_peaky_checkpoint
from test_compile import STEPS, VOCAB, decode

import cormlm
from cormlm import compile_cache
from cormlm.cache import paged_attention, paged_kernel
from cormlm.cache.paged import DIM_MARKS
from cormlm.models import linear

pytestmark = pytest.mark.skipif(not compile_cache.supported(), reason="this torch cannot save compiled functions")

FULL = cormlm.CacheConfig("full", block_size=16)  # small blocks: the pools grow while decoding
CORM = cormlm.CacheConfig("corm", window=8, recent=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_peaky_checkpoint(tmp_path_factory.mktemp("saved"), num_key_value_heads=2)


@pytest.fixture
def saved(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CORMLM_COMPILE_CACHE", str(tmp_path))
    return tmp_path


def compiled(folder: Path) -> tuple[torch.nn.Module, compile_cache.SavedDecodeStep, list[int]]:
    """A freshly loaded and compiled model (Dynamo reset: nothing traced in this process
    survives), its saved-step wrapper, and a list that counts calls to torch.compile's step."""
    torch._dynamo.reset()
    model = cormlm.compile_model(cormlm.load_model(folder))
    step = model.compiled_decode
    assert isinstance(step, compile_cache.SavedDecodeStep)
    fallbacks: list[int] = []
    jit = step.fallback
    step.fallback = lambda *args: fallbacks.append(1) or jit(*args)
    return model, step, fallbacks


@torch.inference_mode()
@pytest.mark.parametrize("cfg", [FULL, CORM], ids=["full", "corm"])
def test_a_later_run_loads_the_saved_step_and_decodes_as_eager(folder, saved, cfg):
    prompt = random_prompt(40, 7, VOCAB)
    want_tokens, want_logits, want_kept, capacities = decode(cormlm.load_model(folder), cfg, prompt, STEPS)
    if cfg is FULL:
        assert len(capacities) > 1, "the pool never grew: the saved step's symbolic block counts go untested"

    first, step, fallbacks = compiled(folder)
    got = decode(first, cfg, prompt, STEPS)
    assert (step.saved, step.loaded, fallbacks) == (1, 0, [])
    assert len(list(saved.glob("decode-*.pt2"))) == 1 and not list(saved.glob("*.partial"))

    later, step, fallbacks = compiled(folder)  # as a new process would: load, no trace
    for run in (got, decode(later, cfg, prompt, STEPS)):
        tokens, logits, kept, _ = run
        assert tokens == want_tokens and kept == want_kept
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert (step.saved, step.loaded, step.refusals, fallbacks) == (0, 1, 0, [])


@torch.inference_mode()
def test_one_model_saves_a_step_per_kind_of_cache(folder, saved):
    """A second kind of step traced while the first is held in memory (the saved guards'
    state takes the model along, and a loaded step cannot be pickled)."""
    model, step, fallbacks = compiled(folder)
    prompt = random_prompt(40, 9, VOCAB)
    for cfg in (FULL, CORM):
        decode(model, cfg, prompt, 2)
    assert (step.saved, fallbacks) == (2, []) and len(list(saved.glob("decode-*.pt2"))) == 2
    assert model.compiled_decode is step


@torch.inference_mode()
@pytest.mark.parametrize("when", ["before loading", "after loading"])
def test_a_changed_module_constant_takes_torch_compile(folder, saved, monkeypatch, when):
    """A module constant the trace read (what graphs call for decode attention, or the
    dense-segments threshold of its tensor operations) differs from the saved step's: found
    when the file is loaded (the saved values) or, changed later, by the loaded step's
    guards; either way torch.compile decodes, as eager does, with the pools marked dynamic
    again for it."""
    prompt = random_prompt(40, 3, VOCAB)
    first, _, _ = compiled(folder)
    decode(first, CORM, prompt, 2)
    assert len(list(saved.glob("decode-*.pt2"))) == 1

    later, step, fallbacks = compiled(folder)
    if when == "after loading":
        decode(later, CORM, prompt, 2)
        assert (step.loaded, fallbacks) == (1, [])
    if paged_kernel.graph_path == "native":  # the graph calls the C kernel: have it fuse the tensor operations
        monkeypatch.setattr(paged_kernel, "graph_path", "torch")
    else:  # it fuses the tensor operations: have them take the scatter path
        monkeypatch.setattr(paged_attention, "DENSE_SEGMENTS_MAX", 0)
    want_tokens, want_logits, want_kept, _ = decode(cormlm.load_model(folder), CORM, prompt, 24)
    tokens, logits, kept, _ = decode(later, CORM, prompt, 24)
    assert step.refusals == 1 and len(fallbacks) == 24 and step.saved == 0
    assert tokens == want_tokens and kept == want_kept
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_a_damaged_file_is_compiled_again(folder, saved):
    prompt = random_prompt(40, 5, VOCAB)
    first, _, _ = compiled(folder)
    decode(first, CORM, prompt, 2)
    (path,) = saved.glob("decode-*.pt2")
    path.write_bytes(b"not a compiled function")
    damaged, step, fallbacks = compiled(folder)
    with pytest.warns(RuntimeWarning, match="could not load the saved decode step"):
        decode(damaged, CORM, prompt, 2)
    assert (step.loaded, step.saved, fallbacks) == (0, 1, [])
    assert path.read_bytes() != b"not a compiled function"


@torch.inference_mode()
def test_the_key_separates_what_the_guards_do_not_see(folder, monkeypatch):
    model = cormlm.load_model(folder)

    def key(cfg=CORM, batch=1, last=True):
        cache = cormlm.make_cache(model, cfg, batch)
        ids = torch.zeros(batch, 1, dtype=torch.long)
        return compile_cache.step_key(model, cache, (ids, None, 0, cache, False, last), None)

    base = key()
    assert key() == base
    others = [key(batch=2), key(cormlm.CacheConfig("corm", window=16, recent=4)), key(FULL), key(last=False)]
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    others.append(key())
    monkeypatch.undo()
    monkeypatch.setattr(linear, "_graph_choices", {(64, 64, 1, torch.float32): "split"})
    others.append(key())
    assert base not in others and len(set(others)) == len(others)


def test_saving_off_compiles_as_before(folder, monkeypatch):
    monkeypatch.setenv("CORMLM_COMPILE_CACHE", "off")
    assert compile_cache.folder() is None
    model = cormlm.compile_model(cormlm.load_model(folder))
    assert not isinstance(model.compiled_decode, compile_cache.SavedDecodeStep)


def test_kernel_choices_are_measured_once_per_machine(folder, saved, monkeypatch):
    model = cormlm.load_model(folder)
    compile_cache.calibrate_once(model, saved)
    measured = linear.graph_choices()
    assert measured and len(list(saved.glob("kernels-*.json"))) == 1

    linear._graph_choices.clear()
    monkeypatch.setattr(linear, "calibrate", lambda model: pytest.fail("measured again"))
    compile_cache.calibrate_once(model, saved)
    assert linear.graph_choices() == measured

    (path,) = saved.glob("kernels-*.json")
    path.write_text("{damaged", encoding="utf-8")
    calls = []
    monkeypatch.setattr(linear, "calibrate", lambda model: calls.append(model))
    compile_cache.calibrate_once(model, saved)
    assert calls == [model]


@torch.inference_mode()
def test_unmarked_pools_stay_unmarked_as_they_grow(folder):
    model = cormlm.load_model(folder)
    cache = cormlm.make_cache(model, FULL)
    model(torch.tensor([random_prompt(20, 1, VOCAB)]), cache=cache)
    pool = cache.pools[0]

    def marked() -> list[bool]:
        return [any(hasattr(t, name) for name in DIM_MARKS)
                for t in (pool.keys, pool.values, pool.positions, pool.owner, *pool.state.values())]

    assert all(marked())
    pool.set_dynamic_marks(False)
    assert not any(marked())
    capacity = pool.capacity
    for _ in range(400):  # until the pool grows into new tensors
        model(torch.tensor([[1]]), cache=cache)
        if pool.capacity > capacity:
            break
    assert pool.capacity > capacity and not any(marked())
    pool.set_dynamic_marks(True)
    assert all(marked())
