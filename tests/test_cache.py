"""The ragged cache's storage: exact attention through every path, memory that follows the
retained tokens, sliding windows, chunked prefill, and independence from block size."""

from __future__ import annotations

import pytest
import torch
from checkpoints import save_hf_model
from safetensors.torch import load_file, save_file

import cormlm
from cormlm.cache.paged import BlockPool, bucket

CORM_PARAMS = {"corm": {"window": 8, "recent": 4}}


def _peaky(folder, scale: float):
    """Scale q/k projections so attention concentrates and CORM really evicts."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    for name in tensors:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensors[name] = tensors[name] * scale
    save_file(tensors, path)
    return folder


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    folder = save_hf_model(tmp_path_factory.mktemp("gqa"), num_key_value_heads=2, max_position_embeddings=1024)
    return cormlm.load_model(_peaky(folder, 4.0))


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    folder = save_hf_model(tmp_path_factory.mktemp("mistral"), model_type="mistral", num_key_value_heads=2,
                           sliding_window=12, max_position_embeddings=1024)
    return cormlm.load_model(folder)


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 160, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_full_policy_multi_call_equals_one_forward(gqa):
    """Chunks after the first attend over keys gathered from the pool: still exact."""
    ids = _ids(3, 50)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    mask[2, :30] = 0
    reference = gqa(ids, attention_mask=mask)
    cache = cormlm.make_cache(gqa, cormlm.CacheConfig("full", block_size=5), batch_size=3)
    got = torch.cat([gqa(ids[:, :17], attention_mask=mask[:, :17], cache=cache),
                     gqa(ids[:, 17:33], attention_mask=mask[:, 17:33], cache=cache)]
                    + [gqa(ids[:, t:t + 1], cache=cache) for t in range(33, 50)], dim=1)
    real = mask.bool()
    assert (got[real] - reference[real]).abs().max() <= 1e-4


@pytest.mark.parametrize("policy", ["full", "corm"])
def test_results_do_not_depend_on_block_size(gqa, policy):
    ids = _ids(2, 40, seed=1)
    runs = []
    for block_size in (1, 7, 16, 64):
        cfg = cormlm.CacheConfig(policy, **CORM_PARAMS.get(policy, {}), block_size=block_size)
        out = cormlm.generate(gqa, ids, max_new_tokens=20, cache=cfg, eos_token_id=[])
        held = [[[p.tolist() for p in row] for row in out.cache.positions(layer)] for layer in range(2)]
        runs.append((out.new_tokens, held))
    assert all(run == runs[0] for run in runs[1:])


def test_default_block_size_follows_whether_the_cache_evicts(gqa, mistral):
    """Unset, a block is 64 slots for a cache that never evicts and 16 when keys can go
    (a policy that evicts, or a sliding-window model under the full policy); set, it is kept."""
    def slots(model, cfg):
        return cormlm.make_cache(model, cfg).pools[0].block_size

    assert slots(gqa, cormlm.CacheConfig("full")) == 64
    assert slots(mistral, cormlm.CacheConfig("full")) == 16
    for policy, params in (("corm", CORM_PARAMS["corm"]), ("h2o", {"budget": 8}), ("streaming", {"recent": 8})):
        assert slots(gqa, cormlm.CacheConfig(policy, **params)) == 16
    assert slots(gqa, cormlm.CacheConfig("full", block_size=5)) == 5
    assert slots(gqa, cormlm.CacheConfig("corm", **CORM_PARAMS["corm"], block_size=32)) == 32


def test_pool_buckets_cost_at_most_a_thirty_second_of_an_octave():
    """Pool sizes round up by <= 3.2% (above the smallest size), so a compacted pool stays
    within the slack at which the cache compacts again."""
    for n in range(1, 5000):
        assert n <= bucket(n) <= max(8, n + n // 32 + 1), n
        assert bucket(n, 2) == max(bucket(n), 2) if n > 8 else bucket(n, 2) == max(n, 2)
    assert bucket(bucket(1000)) == bucket(1000)


def test_the_smallest_pool_is_the_same_in_slots_for_every_block_size(gqa):
    """A short prompt's pool: larger blocks do not hold more slots than the minimum needs."""
    for block_size in (16, 64):
        cache = cormlm.make_cache(gqa, cormlm.CacheConfig("full", block_size=block_size))
        with torch.inference_mode():
            gqa(_ids(1, 3), cache=cache)
        assert cache.pools[0].capacity * block_size == 128


def _slot_bytes(cache) -> int:
    """Bytes one slot costs: key, value, position and policy state."""
    pool = cache.pools[0]
    per_block = sum(t[0].numel() * t.element_size() for t in (pool.keys, pool.values, pool.positions,
                                                               *pool.state.values()))
    return per_block // pool.block_size


def test_held_slots_stay_within_the_compaction_slack_at_every_evicting_step(gqa):
    """After every decode step that evicted, each pool holds at most COMPACT_SLACK times its
    live keys in slots, or is already as small as repacking could make it (not only at
    periodic checks: the eviction wave after a prompt empties many slots per step)."""
    from cormlm.cache.ragged import COMPACT_SLACK

    cache = cormlm.make_cache(gqa, cormlm.CacheConfig("corm", window=4, recent=4), batch_size=2)
    with torch.inference_mode():
        gqa(_ids(2, 400, seed=5), cache=cache)
        token = torch.full((2, 1), 7)
        for _ in range(40):
            gqa(token, cache=cache)
            for pool in cache.pools:
                live, bs = int((pool.positions >= 0).sum()), pool.block_size
                repacked = pool.bucket(-(-live // bs) + 3 * pool.num_streams)
                assert pool.capacity * bs <= COMPACT_SLACK * live or pool.capacity <= repacked
    assert cache.retained_fraction() < 0.5, "the peaky model should let CORM evict"


def test_bytes_follow_retained_tokens(gqa):
    ids = _ids(2, 300, seed=2)
    cfg = cormlm.CacheConfig("corm", window=16, recent=16)
    out = cormlm.generate(gqa, ids, max_new_tokens=17, cache=cfg, eos_token_id=[])  # ends on a compaction check
    stats = out.cache.stats()
    retained = sum(n for layer in stats.retained_tokens for row in layer for n in row)
    assert stats.retained_fraction < 0.6, "the peaky model should let CORM evict"
    streams = 2 * gqa.config.num_kv_heads * gqa.config.num_layers
    budget = 1.25 * (retained + streams * 16) * _slot_bytes(out.cache) + 4096
    assert stats.bytes_held <= budget
    assert stats.bytes_held < 0.75 * stats.bytes_full
    assert stats.bytes_held == sum(t.untyped_storage().nbytes() for t in out.cache.storage_tensors())


def test_freed_blocks_are_reused(gqa):
    """Decoding with steady eviction does not grow the pool: evicted blocks are taken again."""
    cfg = cormlm.CacheConfig("corm", window=8, recent=8, block_size=4)
    cache = cormlm.make_cache(gqa, cfg, batch_size=1)
    token = _ids(1, 1)
    with torch.inference_mode():
        gqa(_ids(1, 64, seed=3), cache=cache)
        capacities = []
        for _ in range(150):
            token = gqa(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
            capacities.append(cache.pools[0].capacity)
    assert max(capacities[50:]) <= max(capacities[:50])


@pytest.mark.parametrize("policy", ["full", "corm"])
def test_sliding_window_drops_keys_under_every_policy(mistral, policy):
    window = mistral.config.sliding_window
    cfg = cormlm.CacheConfig(policy, **({"window": 4, "recent": 2} if policy == "corm" else {}))
    # 100 + 30 tokens: the window's 12 keys held in the smallest pool (128 slots) plus the
    # layers' shared bookkeeping are under half of a full cache's bytes with room to spare
    out = cormlm.generate(mistral, _ids(2, 100, seed=4), max_new_tokens=30, cache=cfg, eos_token_id=[])
    seen = out.cache.stats().tokens_seen
    for layer in range(mistral.config.num_layers):
        for row, heads in enumerate(out.cache.positions(layer)):
            for held in heads:
                assert held.numel() <= window
                assert held.min() > seen[row] - 1 - window
    assert out.cache.stats().bytes_held < out.cache.stats().bytes_full / 2


def test_sliding_window_full_cache_matches_full_forward(mistral):
    ids = _ids(1, 45, seed=5)
    reference = mistral(ids)
    cache = cormlm.make_cache(mistral, cormlm.CacheConfig("full"), batch_size=1)
    pieces = [mistral(ids[:, :20], cache=cache)] + [mistral(ids[:, t:t + 1], cache=cache) for t in range(20, 45)]
    assert (torch.cat(pieces, dim=1) - reference).abs().max() <= 1e-4


def test_prefill_in_one_call_or_in_chunks_bounds_the_pool(gqa, monkeypatch):
    peak = {"blocks": 0}
    original = BlockPool._grow

    def spy(self, needed):
        original(self, needed)
        peak["blocks"] = max(peak["blocks"], self.capacity)

    monkeypatch.setattr(BlockPool, "_grow", spy)
    ids = _ids(1, 600, seed=6)
    cormlm.generate(gqa, ids, max_new_tokens=4, eos_token_id=[], cache=cormlm.CacheConfig("corm", window=16, recent=16))
    one_shot_peak, peak["blocks"] = peak["blocks"], 0
    chunked = cormlm.generate(gqa, ids, max_new_tokens=4, eos_token_id=[],
                              cache=cormlm.CacheConfig("corm", window=16, recent=16, prefill_chunk=64))
    streams = gqa.config.num_kv_heads  # one row: a stream per KV head shares each layer's pool
    # a prompt in one call stores only the keys that survive its step's evictions, never the whole prompt
    assert one_shot_peak * 16 < 0.7 * streams * 600
    assert peak["blocks"] * 16 < 0.7 * streams * 600
    assert chunked.cache.stats().retained_fraction < 0.7


def test_chunked_prefill_with_full_policy_is_exact(gqa):
    ids = _ids(2, 90, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :25] = 0
    one = cormlm.generate(gqa, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[],
                          cache=cormlm.CacheConfig("full"))
    chunked = cormlm.generate(gqa, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[],
                              cache=cormlm.CacheConfig("full", prefill_chunk=16))
    assert chunked.new_tokens == one.new_tokens


@pytest.mark.parametrize("shape, dim", [((5, 1, 4), 1), ((5, 3, 1, 4), -3), ((2, 8, 3), 1), ((7, 71, 2), 1), ((4, 6), 0)])
def test_group_max_equals_amax(shape, dim):
    from cormlm.cache.policy import group_max

    x = torch.randn(shape, dtype=torch.float64)
    assert torch.equal(group_max(x, dim), x.amax(dim=dim, keepdim=True))


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("start, rows", [(0, 6), (3, 4), (13, 3)])
def test_prompt_scores_masked_from_the_first_row_equal_the_general_mask(alibi, start, rows):
    from cormlm.cache.ragged import explicit_probs
    from cormlm.models.attention_ops import AttentionSpec

    torch.manual_seed(start)
    b, hkv, g, length, d = 2, 2, 3, 16, 8
    spec = AttentionSpec(hkv * g, hkv, d, d ** -0.5,
                         alibi_slopes=torch.rand(hkv * g, dtype=torch.float64) if alibi else None)
    q = torch.randn(b, hkv * g, rows, d, dtype=torch.float64)
    k = torch.randn(b, hkv, length, d, dtype=torch.float64)
    k_pos = torch.arange(length).expand(b, length)
    q_pos = k_pos[:, start:start + rows]
    general, seen = explicit_probs(q, k.transpose(-1, -2), q_pos, k_pos, spec)
    fast, fast_seen = explicit_probs(q, k.transpose(-1, -2), q_pos, k_pos, spec, causal_start=start)
    assert torch.equal(fast, general) and torch.equal(fast_seen, seen)


def test_layers_with_different_sliding_windows_are_refused():
    from cormlm.cache.registry import build_cache
    from cormlm.models.attention_ops import AttentionSpec

    cache = build_cache(cormlm.CacheConfig("corm"), batch_size=1, num_layers=2, num_kv_heads=1, head_dim=4,
                        dtype=torch.float32, device=torch.device("cpu"), sliding_window=None, query_group=None)
    positions, _ = cache.begin_step(None, 2)
    x = torch.randn(1, 1, 2, 4)
    for first, second in ((4, 8), (None, 8), (4, None)):
        cache.attend(0, x, x, x, positions, AttentionSpec(1, 1, 4, 0.5, sliding_window=first))
        with pytest.raises(NotImplementedError, match="one sliding window"):
            cache.attend(1, x, x, x, positions, AttentionSpec(1, 1, 4, 0.5, sliding_window=second))


@pytest.mark.parametrize("policy, params", [("corm", {"window": 8, "recent": 4}), ("corm", {"magnitude": 1.0}),
                                            ("h2o", {"budget": 0.5}), ("scissorhands", {"budget": 0.5})])
def test_prompt_scoring_in_chunks_of_any_size(gqa, policy, params, monkeypatch):
    """However many rows a chunk of explicit scores holds (one chunk, or SCORE_MIN_ROWS at a
    time), the policy's state after a prompt is the same and every position's logits equal
    the full cache's."""
    import cormlm.cache.ragged as ragged

    torch.manual_seed(1)
    ids = torch.randint(0, gqa.config.vocab_size, (2, 40))
    with torch.inference_mode():
        full = gqa.forward_unchecked(ids, None, cormlm.make_cache(gqa, cormlm.CacheConfig("full"), 2))
        states = []
        for score_bytes in (2**30, 1):  # one chunk; SCORE_MIN_ROWS rows at a time
            monkeypatch.setattr(ragged, "SCORE_BYTES", score_bytes)
            cache = cormlm.make_cache(gqa, cormlm.CacheConfig(policy, **params), 2)
            logits = gqa.forward_unchecked(ids, None, cache)
            torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
            states.append([{name: t.clone() for name, t in pool.state.items()} for pool in cache.pools])
    for layer_one, layer_many in zip(*states):
        for name in layer_one:
            torch.testing.assert_close(layer_many[name], layer_one[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("policy, params", [("corm", {"window": 8, "recent": 4}), ("corm", {"window": 8, "recent": 4, "magnitude": 1.0}),
                                            ("corm", {"window": 8, "recent": 4, "budget": 20}),
                                            ("h2o", {"budget": 0.5}), ("scissorhands", {"budget": 0.5})])
@pytest.mark.parametrize("attention", ["native", "torch"])
def test_state_update_after_the_step_equals_per_layer(gqa, policy, params, attention, monkeypatch):
    """An eager decode step updates every layer's policy state at once after the last layer;
    a compiled one updates each layer with its attention. Both give the same state bit for
    bit, hence the same evictions and logits (rows of different lengths: per-block query
    positions), whichever decode-attention path computed the probabilities."""
    from cormlm.cache import paged_kernel
    from cormlm.cache.ragged import RaggedCache

    monkeypatch.setenv(paged_kernel.FORCE_ENV, attention)

    torch.manual_seed(2)
    ids = torch.randint(0, gqa.config.vocab_size, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # the second row is shorter: its streams' query positions differ
    runs = []
    with torch.inference_mode():
        for per_layer in (False, True):
            monkeypatch.setattr(RaggedCache, "_state_per_layer", staticmethod(lambda per_layer=per_layer: per_layer))
            out = cormlm.generate(gqa, ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[],
                                  cache=cormlm.CacheConfig(policy, **params))
            pools = out.cache.pools
            assert out.cache.retained_fraction() < 1, "nothing was evicted: the test shows nothing"
            runs.append((out.new_tokens, [pool.positions.clone() for pool in pools],
                         [{name: t.clone() for name, t in pool.state.items()} for pool in pools]))
    (tokens, positions, states), (tokens_ref, positions_ref, states_ref) = runs
    assert tokens == tokens_ref
    for got, want in zip(positions, positions_ref):
        assert torch.equal(got, want)
    for got, want in zip(states, states_ref):
        assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in got)


@pytest.mark.parametrize("seed", range(5))
def test_aligned_lead_leaves_the_fewest_empty_slots_for_one_common_tail_fill(seed):
    from cormlm.cache.paged import aligned_lead

    g = torch.Generator().manual_seed(seed)
    block = int(torch.randint(1, 33, (1,), generator=g))
    counts = torch.randint(0, 200, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g)
    lead, fill = aligned_lead(counts, block)
    live = counts > 0
    assert 1 <= fill <= block and ((lead >= 0) & (lead < block)).all() and (lead[~live] == 0).all()
    assert (((counts + lead)[live] - fill) % block == 0).all(), "every tail holds `fill` keys"
    fewest = min(int((((f - counts) % block) * live).sum()) for f in range(1, block + 1))
    assert int(lead.sum()) == fewest


def test_a_repacked_pool_keeps_every_key_and_fills_its_streams_tails_alike(gqa, monkeypatch):
    """Tails aligned by a repack are taken again together by decode steps that fill tails
    (``reuse_holes`` off: decode steps of an evicting cache otherwise fill holes first)."""
    monkeypatch.setattr(cormlm.cache.ragged.RaggedCache, "reuse_holes", False)
    cache = cormlm.make_cache(gqa, cormlm.CacheConfig("corm", window=4, recent=4), batch_size=2)
    with torch.inference_mode():
        gqa(_ids(2, 150, seed=6), cache=cache)
        for _ in range(5):
            gqa(torch.full((2, 1), 3), cache=cache)
        pool = cache.pools[1]
        before = pool.stream_positions()
        pool.compact()
        assert all(torch.equal(a, b) for a, b in zip(pool.stream_positions(), before))
        live = pool.live_counts().cpu() > 0
        assert live.sum() > 1 and len(set(pool.fill[live].tolist())) == 1
        for _ in range(2 * pool.block_size):  # the next tail blocks are taken together
            had_room = pool.tail_has_room()
            gqa(torch.full((2, 1), 3), cache=cache)
            assert had_room or len(set(pool.fill[live].tolist())) == 1


@pytest.mark.parametrize("model_name, policy, params", [
    ("gqa", "corm", {"window": 4, "recent": 4}), ("gqa", "h2o", {"budget": 0.5}),
    ("gqa", "scissorhands", {"budget": 40}), ("gqa", "streaming", {"sink": 2, "recent": 30}),
    ("mistral", "full", {})])
@torch.inference_mode()
def test_decode_steps_store_into_holes_what_tails_would_store(request, monkeypatch, model_name, policy, params):
    """Decode steps of a cache that evicts store each stream's key in the lowest free slot of
    its own blocks: the same live keys, values, positions and state, and the same logits, as
    storing into tail blocks; a step takes fresh blocks only where a stream has no free slot
    left (as many as ``bytes_for_next_token`` said before it); fewer blocks held than with tails."""
    model = request.getfixturevalue(model_name)
    ids = _ids(2, 90, seed=31)
    taken = []
    real_give = BlockPool.give_blocks
    monkeypatch.setattr(BlockPool, "give_blocks", lambda self, streams: taken.append(
        len(streams) * self.block_nbytes()) or real_give(self, streams))

    def run(holes: bool):
        monkeypatch.setattr(cormlm.cache.ragged.RaggedCache, "reuse_holes", holes)
        cache = cormlm.make_cache(model, cormlm.CacheConfig(policy, block_size=4, **params), batch_size=2)
        logits, contents, used = [model(ids, cache=cache)[:, -1]], [], []
        for _ in range(40):
            expected = cache.bytes_for_next_token()
            taken.clear()
            logits.append(model(logits[-1].argmax(-1, keepdim=True), cache=cache)[:, -1])
            if holes:
                assert sum(taken) == expected
            contents.append(_live_content(cache))
            used.append(sum(pool.used_blocks() for pool in cache.pools))
        return torch.stack(logits), contents, used

    hole_logits, hole_contents, hole_used = run(True)
    tail_logits, tail_contents, tail_used = run(False)
    torch.testing.assert_close(hole_logits, tail_logits, rtol=1e-5, atol=1e-5)
    for hole_step, tail_step in zip(hole_contents, tail_contents):
        for hole_layer, tail_layer in zip(hole_step, tail_step):
            positions, keys, values, state, counts = hole_layer
            assert torch.equal(positions, tail_layer[0]) and torch.equal(counts, tail_layer[4])
            torch.testing.assert_close((keys, values, state), tail_layer[1:4], rtol=1e-5, atol=1e-5)
    assert sum(hole_used) < sum(tail_used), "holes filled: fewer blocks held over the steps"


@pytest.fixture(scope="module")
def falcon_alibi(tmp_path_factory):
    from checkpoints import make_falcon_checkpoint
    return cormlm.load_model(make_falcon_checkpoint(tmp_path_factory.mktemp("falcon_alibi"), "rw"))


@pytest.mark.parametrize("model_name", ["gqa", "mistral", "falcon_alibi"])
@pytest.mark.parametrize("policy", [None, "full", "corm"])
@pytest.mark.parametrize("padded", [False, True])
@torch.inference_mode()
def test_last_logits_only_equals_the_last_row_and_caches_the_same(request, model_name, policy, padded):
    """With last_logits_only the last block computes the last token's output alone: the same
    logits as the full forward's last row, the same keys and values cached, the same evictions."""
    model = request.getfixturevalue(model_name)
    ids = _ids(2, 40, seed=11)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :13] = 0

    def run(last_only: bool):
        cache = None if policy is None else cormlm.make_cache(
            model, cormlm.CacheConfig(policy, **CORM_PARAMS.get(policy, {})), batch_size=2)
        logits = model(ids, attention_mask=mask if padded else None, cache=cache, last_logits_only=last_only)
        return logits[:, -1], cache

    (whole, whole_cache), (last, last_cache) = run(False), run(True)
    assert (last - whole).abs().max() <= 1e-4
    if policy is None:
        return
    for layer in range(model.config.num_layers):
        assert [[p.tolist() for p in row] for row in last_cache.positions(layer)] == \
               [[p.tolist() for p in row] for row in whole_cache.positions(layer)]
    for got, want in zip(last_cache.storage_tensors(), whole_cache.storage_tensors()):
        assert torch.equal(got, want)


def _store_all_then_evict(self, pool, q, k, v, positions, spec, out_rows):
    """The way a prompt was stored before: every key appended, the policy's state read back
    from the pool, evictions after the step (end_step) and a repack of the holes."""
    b, hq, t, d = q.shape
    hkv = self.num_kv_heads
    new_keys = k.reshape(b * hkv, t, d)
    stream_pos = positions[:, None, :].expand(b, hkv, t).reshape(b * hkv, t)
    slots = pool.append(new_keys, v.reshape(b * hkv, t, d), stream_pos, self._stream_counts())
    for name, value in self._stored(new_keys).items():
        pool.state[name].view(-1)[slots[slots >= 0]] = value[slots >= 0].to(pool.state[name].dtype)
    return self._attend_pool(pool, q, k, v, positions, slots, spec, out_rows)


def _live_content(cache) -> list:
    """Per layer and stream: positions, keys, values and state of the live keys, in position order."""
    content = []
    for pool in cache.pools:
        keys, values, positions, slots = pool.gather_dense()
        held = slots >= 0
        state = {name: tensor.view(-1)[slots.clamp(min=0)][held] for name, tensor in pool.state.items()}
        content.append((positions[held], keys[held], values[held], state, held.sum(dim=1)))
    return content


@pytest.mark.parametrize("model_name", ["gqa", "mistral"])
@pytest.mark.parametrize("policy, params", [("corm", {"window": 8, "recent": 4}),
                                            ("corm", {"window": 8, "recent": 4, "magnitude": 1.0}),
                                            ("h2o", {"budget": 0.5}), ("scissorhands", {"budget": 12}),
                                            ("streaming", {"sink": 2, "recent": 6}), ("knorm", {"budget": 9}),
                                            ("full", {})])
@pytest.mark.parametrize("padded", [False, True])
@torch.inference_mode()
def test_a_prompt_stores_only_its_survivors_as_store_evict_repack_would(request, monkeypatch, model_name, policy,
                                                                        params, padded):
    """A prompt into an empty cache stores only the keys its step's evictions leave: the same
    keys, values, positions and state as storing all, evicting after the step and repacking,
    each layer's tails aligned and a block per stream free as a repack leaves them, and the
    next steps' logits are the same."""
    model = request.getfixturevalue(model_name)
    ids = _ids(2, 45, seed=21)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :11] = 0
    cfg = cormlm.CacheConfig(policy, **params)
    tails, spare = [], []

    def run():
        cache = cormlm.make_cache(model, cfg, batch_size=2)
        logits = [model(ids, attention_mask=mask, cache=cache)[:, -1]]
        content = _live_content(cache)
        tails.append([(pool.fill[counts > 0]).tolist() for pool, (*_, counts) in zip(cache.pools, content)])
        spare.append([pool.capacity - pool.used_blocks() for pool in cache.pools])
        for _ in range(3):
            logits.append(model(logits[-1].argmax(-1, keepdim=True), cache=cache)[:, -1])
        return content, torch.stack(logits), cache

    survivors, survivor_logits, cache = run()
    with monkeypatch.context() as patch:
        patch.setattr(cormlm.cache.ragged.RaggedCache, "_prompt_survivors", _store_all_then_evict)
        everything, everything_logits, _ = run()
    for (pos, keys, values, state, counts), (pos2, keys2, values2, state2, counts2) in zip(survivors, everything):
        assert torch.equal(pos, pos2) and torch.equal(counts, counts2)
        assert torch.equal(keys, keys2) and torch.equal(values, values2)
        assert state.keys() == state2.keys() and all(torch.equal(state[n], state2[n]) for n in state)
    # (the two pools may lay their blocks out differently: decode attention sums in another order)
    torch.testing.assert_close(survivor_logits, everything_logits, rtol=1e-5, atol=1e-5)
    if policy != "full" or model_name == "mistral":  # a policy or window that evicts
        # each layer's streams with keys fill their tail blocks alike (they take new blocks on the same steps)
        assert all(len(set(fills)) <= 1 for fills in tails[0])
        # and, as a repack leaves it, a free block per stream: the first round of tail blocks needs no growth
        assert min(spare[0]) >= 2 * model.config.num_kv_heads
        assert any(int(c.sum()) < 2 * model.config.num_kv_heads * 45 for *_, c in survivors), "nothing was evicted"
