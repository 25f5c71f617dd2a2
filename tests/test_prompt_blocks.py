"""A compiled model's prompt runs each block half by its compiled graph or by the eager
modules, whichever its trials measured faster (cormlm.models.prompt_blocks), with the same
result either way."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from cache_cases import random_prompt
from checkpoints import make_peaky_checkpoint
from trial_state import fresh_trials

import cormlm
from cormlm.errors import InputError
from cormlm.models import prompt_blocks
from cormlm.trials import TRIALS

VOCAB = 160


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_peaky_checkpoint(tmp_path_factory.mktemp("prompt_blocks"), num_key_value_heads=2)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    fresh_trials(monkeypatch, prompt_blocks)


def prompt_logits(model, prompt: list[int], policy: str = "corm") -> tuple[torch.Tensor, list]:
    cfg = cormlm.CacheConfig(policy, window=8, recent=4) if policy == "corm" else cormlm.CacheConfig(policy)
    cache = cormlm.make_cache(model, cfg)
    logits = model(torch.tensor([prompt]), cache=cache)
    return logits, [p.tolist() for p in cache.positions(0)[0]]


def count_paths(model) -> dict[str, int]:
    """Replace each block's graphs and module halves by counting wrappers (the graphs' and the
    modules' own results); returns the counts, filled as calls happen."""
    counts = {"graphs": 0, "eager": 0}
    for block in model.blocks:
        pre_graph, post_graph = block.prompt_graphs
        pre, post = block.pre_attention, block.post_attention

        def counted(call, path):
            def run(*args):
                counts[path] += 1
                return call(*args)
            return run

        block.prompt_graphs = (counted(pre_graph, "graphs"), counted(post_graph, "graphs"))
        block.pre_attention, block.post_attention = counted(pre, "eager"), counted(post, "eager")
    return counts


@torch.inference_mode()
def test_either_path_and_the_measured_one_give_the_eager_models_result(folder, monkeypatch):
    eager = cormlm.load_model(folder)
    compiled = cormlm.compile_model(cormlm.load_model(folder))
    prompt = random_prompt(200, 3, VOCAB)  # more rows than a chunk of the eager MLP (128)
    want, want_kept = prompt_logits(eager, prompt)
    counts = count_paths(compiled)
    layers = compiled.config.num_layers
    for path in prompt_blocks.PATHS:
        monkeypatch.setenv(prompt_blocks.FORCE_ENV, path)
        counts.update(graphs=0, eager=0)
        got, kept = prompt_logits(compiled, prompt)
        assert counts == {"graphs": 2 * layers if path == "graphs" else 0, "eager": 2 * layers if path == "eager" else 0}
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert kept == want_kept
    monkeypatch.delenv(prompt_blocks.FORCE_ENV)
    for _ in range(-(-2 * (TRIALS + 1) // layers)):  # calls enough for each half's trials to end
        got, kept = prompt_logits(compiled, prompt)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert kept == want_kept
    status = prompt_blocks.kernel_status()
    for half in ("pre", "post"):
        assert any(re.match(rf"{half}-attention, hidden {compiled.config.hidden_size}, up to 256 rows, float32, "
                            r"1 thread: (graphs|eager)$", line) for line in status), status


class FakeGraphs:
    """Stand-ins for a block's compiled halves (the modules' own results, ``delay`` seconds later)."""

    def __init__(self, block, delay: float) -> None:
        self.pre, self.post, self.delay = block.pre_attention, block.post_attention, delay

    def halves(self):
        def slow(call):
            def run(*args):
                time.sleep(self.delay)
                return call(*args)
            return run
        return slow(self.pre), slow(self.post)


@torch.inference_mode()
@pytest.mark.parametrize("slower", prompt_blocks.PATHS)
def test_the_trials_keep_the_faster_path_of_each_half(folder, slower):
    model = cormlm.load_model(folder)
    for block in model.blocks:
        if slower == "graphs":
            block.prompt_graphs = FakeGraphs(block, 0.004).halves()
        else:  # the graphs are the modules as they are; the modules themselves made slower
            block.prompt_graphs = FakeGraphs(block, 0.0).halves()
            fake = FakeGraphs(block, 0.004).halves()
            block.pre_attention, block.post_attention = fake
    prompt = random_prompt(40, 5, VOCAB)
    calls = 2 * (TRIALS + 1)  # per half and shape
    for _ in range(-(-calls // model.config.num_layers)):
        prompt_logits(model, prompt, "full")
    faster = next(path for path in prompt_blocks.PATHS if path != slower)
    assert prompt_blocks._choices == {(half, model.config.hidden_size, 64, "float32", 1): faster
                                      for half in ("pre", "post")}
    assert prompt_blocks.kernel_status()[0] == f"pre-attention, hidden {model.config.hidden_size}, up to 64 rows, " \
                                               f"float32, 1 thread: {faster}"


@torch.inference_mode()
def test_the_last_blocks_single_row_is_measured_on_its_own(folder):
    """With only the last logits wanted, the last block's post-attention half takes one row:
    its own shape, not the prompt's."""
    model = cormlm.load_model(folder)
    for block in model.blocks:
        block.prompt_graphs = (block.pre_attention, block.post_attention)
    cache = cormlm.make_cache(model, cormlm.CacheConfig("full"))
    model(torch.tensor([random_prompt(40, 5, VOCAB)]), cache=cache, last_logits_only=True)
    keys = set(prompt_blocks._trials)
    hidden = model.config.hidden_size
    assert keys == {("pre", hidden, 64, "float32", 1), ("post", hidden, 64, "float32", 1),
                    ("post", hidden, 1, "float32", 1)}
    assert f"post-attention, hidden {hidden}, up to 1 row, float32, 1 thread: still measuring (1 of 18 calls)" \
        in prompt_blocks.kernel_status()


def test_a_misspelt_path_is_an_error_naming_both(folder, monkeypatch):
    model = cormlm.load_model(folder)
    for block in model.blocks:
        block.prompt_graphs = (block.pre_attention, block.post_attention)
    monkeypatch.setenv(prompt_blocks.FORCE_ENV, "compiled")
    with pytest.raises(InputError, match=r"CORMLM_PROMPT_BLOCKS='compiled' is not a prompt-block path; use one of "
                                         r"graphs, eager"):
        prompt_logits(model, random_prompt(20, 5, VOCAB), "full")
