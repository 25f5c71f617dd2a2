"""A compiled model decodes what the eager one decodes, and its graphs stay few while the
ragged cache grows, evicts and compacts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cache_cases import kept_positions, random_prompt
from checkpoints import make_peaky_checkpoint
from torch._dynamo.utils import counters

import cormlm
from cormlm.cache import paged_attention, paged_kernel
from cormlm.cache.ragged import RaggedCache

VOCAB = 160
# inductor's run-time checks of each kernel's output sizes, strides and alignment, which
# compile_model turns off: on here, they hold cormlm's operations to their fake implementations
CHECKED = {"size_asserts": True, "alignment_asserts": True}
STEPS = 120  # long enough for the pools to grow across capacity buckets and to compact


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_peaky_checkpoint(tmp_path_factory.mktemp("compile"), num_key_value_heads=2)


def decode(model, cfg: cormlm.CacheConfig, prompt: list[int], steps: int, after_warmup=None):
    """Greedy tokens, per-step logits, final kept positions and pool capacities seen."""
    cache = cormlm.make_cache(model, cfg)
    logits = model(torch.tensor([prompt]), cache=cache, last_logits_only=True)[:, -1]
    tokens, all_logits, capacities = [], [], set()
    for i in range(steps):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(int(token))
        logits = model(token, cache=cache)[:, -1]
        all_logits.append(logits)
        capacities.add(cache.pools[0].capacity)
        if i == 1 and after_warmup is not None:
            after_warmup()
    return tokens, torch.cat(all_logits), kept_positions(cache, model.config.num_layers), capacities


@torch.inference_mode()
@pytest.mark.parametrize("cfg,path,dense", [
    (cormlm.CacheConfig("full", block_size=16), "native", True),  # small blocks: the pool grows
    (cormlm.CacheConfig("corm", window=8, recent=4), "native", True),
    (cormlm.CacheConfig("corm", window=8, recent=4), "torch", True),
    (cormlm.CacheConfig("corm", window=8, recent=4), "torch", False),
    (cormlm.CacheConfig("h2o", budget=24), "native", True)], ids=["full", "corm", "corm-ops", "corm-scatter", "h2o"])
def test_compiled_decode_matches_eager_with_bounded_graphs(folder, cfg, path, dense, monkeypatch):
    """``path``: what the graph calls for decode attention, the C kernel (an opaque op) or the
    tensor operations inductor fuses; ``dense=False``: those take the scatter path that large
    caches (or CUDA) use for per-stream reductions instead of the membership matrix."""
    if path == "native" and not paged_kernel.available():
        pytest.skip("no C compiler to build the decode-attention kernel with")
    monkeypatch.setenv(paged_kernel.FORCE_ENV, path)
    if not dense:
        monkeypatch.setattr(paged_attention, "DENSE_SEGMENTS_MAX", 0)
    eager = cormlm.load_model(folder)
    compiled = cormlm.compile_model(cormlm.load_model(folder), options=CHECKED)
    assert paged_kernel.graph_path == path
    prompt = random_prompt(40, 7, VOCAB)
    want_tokens, want_logits, want_kept, capacities = decode(eager, cfg, prompt, STEPS)

    seen: dict[str, int] = {}
    passes = []  # the eager all-layers eviction pass: the prompt's only (the graph evicts each decode step)
    all_layers = RaggedCache._evict_all
    monkeypatch.setattr(RaggedCache, "_evict_all", lambda self, observed: passes.append(1) or all_layers(self, observed))
    kernel_calls = []  # the compiled step's calls of the C kernel (a prompt's attention never calls it)
    run = paged_kernel.run
    monkeypatch.setattr(paged_kernel, "run", lambda *args: kernel_calls.append(1) or run(*args))
    got_tokens, got_logits, got_kept, _ = decode(
        compiled, cfg, prompt, STEPS, after_warmup=lambda: seen.update(graphs=counters["stats"]["unique_graphs"]))
    assert len(passes) == (0 if cfg.policy == "full" else 1)
    assert len(kernel_calls) == (STEPS * compiled.config.num_layers if path == "native" else 0)

    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert got_kept == want_kept
    if cfg.policy == "full":
        assert len(capacities) > 1, "the pool never grew: the test does not exercise recompilation"
    # every graph (per-block dense parts, head, decode attention) exists after two decode
    # steps; growing, evicting and compacting the pools must not add any
    assert counters["stats"]["unique_graphs"] == seen["graphs"]


@pytest.mark.parametrize("given,want", [
    (None, {"size_asserts": False, "alignment_asserts": False}),
    ({"size_asserts": True, "freezing": True}, {"size_asserts": True, "alignment_asserts": False, "freezing": True})],
    ids=["default", "given"])
def test_every_graph_gets_the_default_options_under_the_given_ones(folder, monkeypatch, given, want):
    seen = []
    real = torch.compile
    # (calls without options: compile_cache asking whether torch can save steps)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: "options" in kw and seen.append(kw["options"]) or real(fn, **kw))
    model = cormlm.compile_model(cormlm.load_model(folder), options=given)
    assert len(seen) == 2 * model.config.num_layers + 2  # prompt halves, head, decode step
    assert all(options == want for options in seen), seen


def test_compiling_twice_changes_nothing(folder):
    model = cormlm.compile_model(cormlm.load_model(folder))
    compiled_head = model.compiled_head
    assert compiled_head is not None
    assert cormlm.compile_model(model) is model and model.compiled_head is compiled_head


@torch.inference_mode()
def test_compiled_steps_have_no_graph_breaks(folder):
    """The decode step is one graph and each block's dense parts one graph each: an operation
    Dynamo cannot trace (e.g. out= into a view) would split them, one graph per layer, and
    the compiled step would run at eager's speed or worse."""
    torch._dynamo.reset()
    counters.clear()
    model = cormlm.compile_model(cormlm.load_model(folder))
    cache = cormlm.make_cache(model, cormlm.CacheConfig("corm", window=8, recent=4))
    logits = model(torch.tensor([random_prompt(40, 3, VOCAB)]), cache=cache)[:, -1]
    for _ in range(3):
        logits = model(logits.argmax(-1, keepdim=True), cache=cache)[:, -1]
    assert not counters["graph_break"], dict(counters["graph_break"])
    # a prompt's three kinds of graph (before and after attention, the head) and the decode step
    assert counters["stats"]["unique_graphs"] <= 4


def test_every_decode_batch_up_to_eight_rows_has_its_products_decided_before_tracing(folder):
    """A compiled step cannot time anything: compile_model measures each product for every
    decode batch of 1-8 rows (each its own row bucket) and for prompts. A batch it left out
    would run F.linear in its graph (a compiled batch of 8 did: 1.8x the eager step's time)."""
    from cormlm.models import linear

    model = cormlm.compile_model(cormlm.load_model(folder))
    shapes = {(*m.weight.shape, m.weight.dtype) for m in model.modules() if isinstance(m, linear.Linear)}
    for rows in range(1, 9):  # (the choices also hold other models' products measured in this process)
        assert shapes <= {(out, inp, dtype) for out, inp, n, dtype in linear.graph_choices() if n == rows}, rows


@torch.inference_mode()
def test_compiled_decode_steps_call_the_native_block(folder, monkeypatch):
    """A decode graph runs each block's dense work as the two C calls (opaque operations) where
    they were chosen before tracing, and decodes what the eager modules decode."""
    from cormlm.models import decode_block

    if not decode_block.available():
        pytest.skip(f"no C kernel here: {decode_block.PRE.unavailable}")
    monkeypatch.setenv(decode_block.FORCE_ENV, "native")
    compiled = cormlm.compile_model(cormlm.load_model(folder), options=CHECKED)
    assert decode_block.graph_path == "native"
    monkeypatch.setenv(decode_block.FORCE_ENV, "torch")  # the eager reference: the modules
    cfg, prompt, steps = cormlm.CacheConfig("corm", window=8, recent=4), random_prompt(40, 5, VOCAB), 30
    want_tokens, want_logits, want_kept, _ = decode(cormlm.load_model(folder), cfg, prompt, steps)
    calls = []
    for kernel in (decode_block.PRE, decode_block.POST):
        real = kernel.function()
        monkeypatch.setattr(kernel, "function", lambda real=real: (lambda *a: calls.append(1) or real(*a)))
    got_tokens, got_logits, got_kept, _ = decode(compiled, cfg, prompt, steps)
    assert len(calls) == 2 * steps * compiled.config.num_layers  # every decode step's blocks, no prompt
    assert got_tokens == want_tokens and got_kept == want_kept
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
