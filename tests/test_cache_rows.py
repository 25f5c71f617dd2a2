"""Rows joining and leaving a running ragged cache (what continuous batching needs): a request
prefilled alone and moved into the batch, decoded with others, freed while others go on,
gives the tokens and kept positions of the same request generated alone."""

from __future__ import annotations

import pytest
import torch
from checkpoints import make_peaky_checkpoint

import cormlm

CONFIGS = {"full": cormlm.CacheConfig("full", block_size=4),
           "corm": cormlm.CacheConfig("corm", window=6, recent=3, block_size=4)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_peaky_checkpoint(tmp_path_factory.mktemp("rows"), factor=4.0, num_key_value_heads=2)
    return cormlm.load_model(folder)


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 160, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


class Row:
    """One request: its prompt, generated ids and the next token not yet fed to the cache."""

    def __init__(self, prompt: list[int], steps: int) -> None:
        self.prompt, self.steps, self.new = prompt, steps, []

    @property
    def done(self) -> bool:
        return len(self.new) == self.steps


@torch.inference_mode()
def _join(model, cfg, cache, row: Row):
    """Prefill ``row`` alone, take its first token, and move its row into ``cache``."""
    alone = cormlm.make_cache(model, cfg, batch_size=1)
    logits = model(torch.tensor([row.prompt]), cache=alone)
    row.new.append(int(logits[0, -1].argmax()))
    if cache is None:
        return alone
    used = cache.bytes_in_use() + alone.bytes_in_use()
    cache.append_rows(alone)
    assert cache.bytes_in_use() == used  # the row's blocks moved, nothing else was taken
    return cache


@torch.inference_mode()
def _decode(model, cache, rows: list[Row]) -> None:
    tokens = torch.tensor([row.new[-1] for row in rows])
    logits = model.forward_unchecked(tokens[:, None], None, cache, last_logits_only=True)
    for row, token in zip(rows, logits[:, -1].argmax(-1).tolist()):
        row.new.append(token)


def _held(cache, row: int) -> list[list[list[int]]]:
    return [[p.tolist() for p in cache.positions(layer)[row]] for layer in range(cache.num_layers)]


@pytest.mark.parametrize("policy", ["full", "corm"])
def test_rows_join_and_leave_as_if_alone(model, policy):
    cfg = CONFIGS[policy]
    a, b, c = Row(_prompt(30, 1), 20), Row(_prompt(11, 2), 30), Row(_prompt(23, 3), 12)
    cache = _join(model, cfg, None, a)
    running = [a]
    for _ in range(5):
        _decode(model, cache, running)
    cache = _join(model, cfg, cache, b)
    running.append(b)
    while not a.done:
        _decode(model, cache, running)
    held_a = _held(cache, 0)
    assert cache.retained_fraction() == pytest.approx(cache.stats().retained_fraction)  # the server's cheap read
    used_before = cache.bytes_in_use()
    cache.remove_rows([0])  # a leaves; b goes on in row 0
    running.remove(a)
    assert cache.bytes_in_use() < used_before and cache.batch_size == 1
    capacity = [pool.capacity for pool in cache.pools]
    cache = _join(model, cfg, cache, c)
    running.append(c)
    if policy == "full":  # a held more than c needs: c takes the blocks a freed
        assert [pool.capacity for pool in cache.pools] == capacity
    while running:
        _decode(model, cache, running)
        for index in reversed([i for i, row in enumerate(running) if row.done]):
            if running[index] is b:
                held_b = _held(cache, index)
            cache.remove_rows([index])
            running.pop(index)
    assert cache.batch_size == 0 and cache.bytes_in_use() == 0
    for row, held in ((a, held_a), (b, held_b), (c, None)):
        solo = cormlm.generate(model, [row.prompt], max_new_tokens=row.steps, cache=cfg, eos_token_id=[])
        assert row.new == solo.new_tokens[0]
        if held is not None:  # the row held what the cache holds alone after the same tokens
            assert held == _held(solo.cache, 0)
    if policy == "corm":
        assert any(len(p) < 30 + 20 for layer in held_a for p in layer), "corm should have evicted"


def test_append_rows_refuses_another_policy(model):
    full = cormlm.make_cache(model, CONFIGS["full"], batch_size=1)
    corm = cormlm.make_cache(model, CONFIGS["corm"], batch_size=1)
    with pytest.raises(ValueError, match="same model, policy"):
        full.append_rows(corm)
