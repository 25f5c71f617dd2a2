"""generate(): ragged batches, stop tokens, sampling, and the full cache's introspection."""

from __future__ import annotations

import pytest
import torch
from checkpoints import save_hf_model

import cormlm
from cormlm.sampling import SamplingConfig, filter_logits, next_tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = save_hf_model(tmp_path_factory.mktemp("gen"), num_key_value_heads=2, initializer_range=0.2)
    return cormlm.load_model(folder)


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


ROWS = [list(range(5, 25)), list(range(40, 47)), list(range(90, 102))]


def test_ragged_batch_rows_equal_each_row_alone(model):
    ids, mask = _left_pad(ROWS)
    batch = cormlm.generate(model, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    for i, row in enumerate(ROWS):
        alone = cormlm.generate(model, torch.tensor([row]), max_new_tokens=16, eos_token_id=[])
        assert batch.sequences[i] == alone.sequences[0]
        assert batch.sequences[i][: len(row)] == row


def test_stops_at_eos_per_row(model):
    ids, mask = _left_pad(ROWS)
    free = cormlm.generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    stop = free.new_tokens[1][4]  # row 1's fifth token becomes the stop token
    out = cormlm.generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=stop, pad_token_id=0)
    first = free.new_tokens[1].index(stop)
    assert out.new_tokens[1] == free.new_tokens[1][: first + 1]
    for i in (0, 2):  # other rows run on until their own stop token or the limit
        expected = free.new_tokens[i]
        cut = expected.index(stop) + 1 if stop in expected else len(expected)
        assert out.new_tokens[i] == expected[:cut]
    # rows that stopped early are padded in the tensor view
    tail = out.tokens[1, ids.shape[1] + first + 1 :]
    assert (tail == 0).all()


def test_stop_ids_default_to_checkpoint(model):
    free = cormlm.generate(model, torch.tensor([ROWS[0]]), max_new_tokens=8, eos_token_id=[])
    stopping = model.config.replace(eos_token_ids=(free.new_tokens[0][2],))
    original = model.config
    model.config = stopping
    try:
        out = cormlm.generate(model, torch.tensor([ROWS[0]]), max_new_tokens=8)
    finally:
        model.config = original
    assert out.new_tokens[0] == free.new_tokens[0][: free.new_tokens[0].index(free.new_tokens[0][2]) + 1]


def test_seeded_sampling_is_reproducible_and_varies(model):
    prompt = torch.tensor([ROWS[2]])
    runs = [cormlm.generate(model, prompt, max_new_tokens=20, temperature=1.0, seed=s, eos_token_id=[]).new_tokens[0]
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    prompt = torch.tensor([ROWS[0]])
    greedy = cormlm.generate(model, prompt, max_new_tokens=10, eos_token_id=[]).new_tokens[0]
    top_k = cormlm.generate(model, prompt, max_new_tokens=10, temperature=2.0, top_k=1, seed=1, eos_token_id=[])
    top_p = cormlm.generate(model, prompt, max_new_tokens=10, temperature=2.0, top_p=1e-6, seed=1, eos_token_id=[])
    assert top_k.new_tokens[0] == greedy
    assert top_p.new_tokens[0] == greedy


def test_filter_logits_keeps_the_right_sets():
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).log()
    assert torch.isfinite(filter_logits(logits, 2, None)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, None, 0.6)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, None, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, None, 0.81)).tolist() == [[True, True, True, False]]


def test_sampling_follows_the_softmax():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().expand(40000, 4).contiguous()
    draws = next_tokens(logits, SamplingConfig(temperature=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert (freq - probs).abs().max() < 0.01
    hot = next_tokens(logits, SamplingConfig(temperature=0.5), torch.Generator().manual_seed(0))
    sharpened = (probs**2) / (probs**2).sum()
    assert (torch.bincount(hot, minlength=4).float() / len(hot) - sharpened).abs().max() < 0.01


def test_full_cache_positions_and_stats(model):
    ids, mask = _left_pad(ROWS)
    out = cormlm.generate(model, ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[])
    cache = out.cache
    # the last sampled token is not fed back, so each row holds prompt + 4 generated tokens
    for row, length in enumerate(len(r) + 4 for r in ROWS):
        for layer in range(model.config.num_layers):
            heads = cache.positions(layer)[row]
            assert len(heads) == model.config.num_kv_heads
            for held in heads:
                assert held.tolist() == list(range(length))
    stats = cache.stats()
    assert stats.tokens_seen == [len(r) + 4 for r in ROWS]
    assert stats.retained_tokens[0][0] == [len(ROWS[0]) + 4] * model.config.num_kv_heads
    storage = sum(t.untyped_storage().nbytes() for t in cache.storage_tensors())
    assert stats.bytes_held == storage
    per_token = 2 * model.config.num_layers * model.config.num_kv_heads * model.config.head_dim * 4
    assert stats.bytes_full == sum(stats.tokens_seen) * per_token


def test_lists_of_token_ids_are_padded_for_you(model):
    rows = [[5, 9, 13, 2, 7], [11, 3]]
    ids, mask = _left_pad(rows)
    from_lists = cormlm.generate(model, rows, max_new_tokens=6, eos_token_id=[])
    from_tensor = cormlm.generate(model, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert from_lists.new_tokens == from_tensor.new_tokens
    single = cormlm.generate(model, rows[1], max_new_tokens=6, eos_token_id=[])
    assert single.new_tokens[0] == from_lists.new_tokens[1]
    with pytest.raises(cormlm.InputError, match="non-empty list of token ids"):
        cormlm.generate(model, [[1, 2], []], max_new_tokens=2)
