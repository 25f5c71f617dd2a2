"""cormlm's baseline eviction policies (streaming, h2o, scissorhands, knorm) against an
independent naive reference (tests/baseline_reference.py).

The reference runs corm_reference's float64 model and applies each policy's rule
literally on Python lists, one (layer, KV head) at a time. It is first checked on its own
(no eviction = plain greedy; its h2o scores and scissorhands verdicts equal the ones a
batched full forward gives; its held counts follow the closed form the rule implies);
then cormlm must give the same greedy tokens, the same per-step logits and keep exactly
the same positions in every layer and KV head, alone, in a left-padded ragged batch, with
MQA and on an ALiBi Falcon-RW.

Checkpoints are tiny random ones with peaky attention (q / k projections scaled up, as in
test_corm.py) so that which keys go depends on the scores. fp32 (cormlm) and float64
(reference) agree only up to rounding, so each case uses the first prompt on which no
decision is within 1e-4 (relative) of flipping: the last dropped vs. first kept h2o score
or key norm, a scissorhands probability vs. its 1/len threshold, a greedy logit gap.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from baseline_reference import (
    baseline_run,
    budget_at,
    expected_held_counts,
    full_attention,
    protected_at,
    streaming_recent_at,
)
from cache_cases import cached_model, first_mismatch, first_robust, kept_positions, left_pad, random_prompt
from checkpoints import make_falcon_checkpoint, make_peaky_checkpoint
from corm_reference import reference_generate, reference_logits

import cormlm
from cormlm.errors import CacheConfigError

VOCAB, LAYERS = 160, 2

# (policy, parameters): int and fraction budgets, recent given or not, scissorhands windows
CASES = [
    ("streaming", dict(recent=6)),
    ("streaming", dict(budget=12)),
    ("streaming", dict(budget=0.5, sink=2)),
    ("h2o", dict(budget=8)),
    ("h2o", dict(budget=0.5)),
    ("h2o", dict(budget=10, recent=3)),
    ("scissorhands", dict(budget=8)),
    ("scissorhands", dict(budget=0.5, window=8)),
    ("scissorhands", dict(budget=10, recent=3, window=4)),
    ("knorm", dict(budget=8)),
    ("knorm", dict(budget=0.5)),
    ("knorm", dict(budget=10, recent=3)),
]
PROMPT, NEW = 24, 16


def _case_id(case) -> str:
    policy, params = case
    return policy + "-" + "-".join(f"{k}{v}" for k, v in params.items())


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return {"gqa": make_peaky_checkpoint(tmp_path_factory.mktemp("bl_gqa"), num_key_value_heads=2),
            "mqa": make_peaky_checkpoint(tmp_path_factory.mktemp("bl_mqa"), num_key_value_heads=1)}


@pytest.fixture(scope="module")
def falcon_rw(tmp_path_factory) -> Path:
    return make_falcon_checkpoint(tmp_path_factory.mktemp("bl_falcon_rw"), "rw")


@cache
def _robust_case(folder: Path, length: int, new: int, policy: str, params: tuple, seed: int = 0):
    """(prompt, reference run) for the first seed from ``seed`` whose run is robust to fp32."""
    return first_robust(lambda prompt: baseline_run(folder, prompt, new, policy, **dict(params)), length, seed,
                        VOCAB, f"{policy} {dict(params)}")


def _cfg(policy: str, params: dict) -> cormlm.CacheConfig:
    return cormlm.CacheConfig(policy, **params)


def _assert_generation_matches(model, policy: str, params: dict, prompt: list[int], run) -> list:
    """cormlm's greedy tokens, kept positions and per-step logits (<= 1e-4) equal the
    reference run's; returns the kept positions after every step."""
    out = cormlm.generate(model, torch.tensor([prompt]), max_new_tokens=NEW, cache=_cfg(policy, params),
                          eos_token_id=[])
    assert out.new_tokens[0] == run.new_tokens
    got = kept_positions(out.cache, LAYERS)
    assert got == run.kept, first_mismatch(got, run.kept)
    logits, _, kept_steps = _step_by_step(model, _cfg(policy, params), prompt, run.new_tokens[:-1])
    for step, (ours, ref) in enumerate(zip(logits, run.step_logits)):
        diff = (ours.double() - ref).abs().max().item()
        assert diff <= 1e-4, f"step {step}: max abs diff {diff}"
    return kept_steps


def _step_by_step(model, cfg, prompt: list[int], tokens: list[int]):
    """make_cache + model(): the prompt, then each token fed back; (per-step logits, cache,
    kept positions after every call)."""
    cache = cormlm.make_cache(model, cfg, batch_size=1)
    with torch.inference_mode():
        logits = [model(torch.tensor([prompt]), cache=cache)[0, -1]]
        kept = [kept_positions(cache, model.config.num_layers)]
        for token in tokens:
            logits.append(model(torch.tensor([[token]]), cache=cache)[0, -1])
            kept.append(kept_positions(cache, model.config.num_layers))
    return logits, cache, kept


# ----------------------------------------------------------------------------------------
# The reference itself
# ----------------------------------------------------------------------------------------


def test_budget_rounding_rule():
    assert budget_at(0.3, 10) == 3  # floor(3.5), not ceil / 4
    assert budget_at(0.25, 10) == 3  # half rounds up (banker's rounding would give 2)
    assert budget_at(0.35, 10) == 4
    assert budget_at(0.01, 10) == 1  # never below one token
    assert budget_at(1.0, 37) == 37 and budget_at(7, 100) == 7
    assert protected_at(0.5, None, 25) == 6 and protected_at(0.5, 2, 25) == 2
    assert streaming_recent_at(12, None, 4, 99) == 8 and streaming_recent_at(3, None, 4, 99) == 0
    assert streaming_recent_at(None, 5, 4, 99) == 5


@pytest.mark.parametrize("policy,params", [("h2o", dict(budget=1.0)), ("scissorhands", dict(budget=1.0)),
                                           ("knorm", dict(budget=100)), ("streaming", dict(recent=100))])
def test_reference_without_eviction_is_plain_greedy(policy, params, folders):
    folder = folders["gqa"]
    prompt = random_prompt(20, 11, VOCAB)
    tokens, kept = reference_generate(folder, prompt, 12, window=None, recent=None)
    run = baseline_run(folder, prompt, 12, policy, **params)
    assert run.new_tokens == tokens and run.kept == kept
    assert not run.evicted_any()


def test_reference_scores_and_verdicts_equal_a_full_forward(folders):
    """Without eviction, h2o's accumulated score of key p is column p of the full causal
    attention (summed over the group's heads and every query), and scissorhands' verdicts
    are those of the full attention rows: a second path through the bookkeeping."""
    folder = folders["gqa"]
    prompt = random_prompt(20, 3, VOCAB)
    h2o = baseline_run(folder, prompt, 10, "h2o", budget=1.0)
    sh = baseline_run(folder, prompt, 10, "scissorhands", budget=1.0, window=12)
    assert h2o.new_tokens == sh.new_tokens
    att = full_attention(folder, prompt + h2o.new_tokens[:-1])
    seen = h2o.seen
    for layer in range(LAYERS):
        for kv in range(2):
            group = range(2 * kv, 2 * kv + 2)
            col = sum(att[layer][h] for h in group).sum(0)
            got = torch.tensor([h2o.scores[layer][kv][p] for p in range(seen)], dtype=torch.float64)
            assert torch.allclose(got, col, rtol=1e-9, atol=1e-9)
            verdicts = sh.unimportant[layer][kv]
            assert sorted(verdicts) == list(range(20 - 12 + 1, seen + 1))  # last w prompt queries, then all
            for u, bad in verdicts.items():
                rows = torch.stack([att[layer][h][u - 1, :u] for h in group])
                assert bad == {p for p in range(u) if bool((rows[:, p] < 1.0 / u).all())}, (layer, kv, u)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reference_follows_the_rule(case, folders):
    """Self-check: budget policies hold exactly the closed-form count after every eviction,
    never drop a protected key, and drop in priority order; streaming keeps sinks + window."""
    policy, params = case
    folder = folders["gqa"]
    _, run = _robust_case(folder, PROMPT, NEW, policy, tuple(params.items()))
    assert run.evicted_any(), "the reference evicted nothing: the test could not fail"
    n, seen = run.prompt_len, run.seen
    budget, recent = params.get("budget"), params.get("recent")
    for layer in range(LAYERS):
        for kv in range(2):
            if policy == "streaming":
                r = streaming_recent_at(budget, recent, params.get("sink", 4), seen)
                assert run.kept[layer][kv] == [p for p in range(seen) if p < params.get("sink", 4) or p >= seen - r]
                continue
            assert run.held_counts[layer][kv] == expected_held_counts(n, seen, budget, recent)
            for t, p in run.evictions[layer][kv]:
                assert p <= t - 1 - protected_at(budget, recent, t)


# ----------------------------------------------------------------------------------------
# cormlm against the reference
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_generation_matches_reference(case, folders):
    """Greedy tokens and kept positions (every layer / KV head) through generate(); then
    every step's logits and kept positions through make_cache + model()."""
    policy, params = case
    folder = folders["gqa"]
    prompt, run = _robust_case(folder, PROMPT, NEW, policy, tuple(params.items()))
    assert run.evicted_any(), "the reference evicted nothing: the test could not fail"
    model = cached_model(folder)
    kept_steps = _assert_generation_matches(model, policy, params, prompt, run)
    assert kept_steps[-1] == run.kept, first_mismatch(kept_steps[-1], run.kept)
    # the eviction really changed what attention saw (so the logits comparison has teeth)
    full = reference_logits(folder, prompt + run.new_tokens[:-1])[len(prompt) - 1:]
    assert max((full[k] - run.step_logits[k]).abs().max().item() for k in range(len(run.step_logits))) > 1e-3


@pytest.mark.parametrize("policy", ["h2o", "scissorhands"])
def test_ragged_batch_rows_equal_reference_alone(policy, folders):
    folder = folders["gqa"]
    params = dict(budget=0.5, window=8) if policy == "scissorhands" else dict(budget=0.5)
    cases = [_robust_case(folder, length, NEW, policy, tuple(params.items()), seed=7) for length in (30, 21, 12)]
    ids, mask = left_pad([prompt for prompt, _ in cases])
    out = cormlm.generate(cached_model(folder), ids, attention_mask=mask, max_new_tokens=NEW, cache=_cfg(policy, params),
                          eos_token_id=[])
    for row, (_, run) in enumerate(cases):
        assert run.evicted_any()
        assert out.new_tokens[row] == run.new_tokens, f"row {row}"
        got = kept_positions(out.cache, LAYERS, row=row)
        assert got == run.kept, f"row {row}: {first_mismatch(got, run.kept)}"


@pytest.mark.parametrize("policy,params", [("h2o", dict(budget=8)), ("h2o", dict(budget=0.5)),
                                           ("scissorhands", dict(budget=0.5, window=8))])
def test_mqa_group_aggregation_matches_reference(policy, params, folders):
    """One KV head shared by all four query heads: scores / verdicts aggregate over all of them."""
    folder = folders["mqa"]
    prompt, run = _robust_case(folder, PROMPT, NEW, policy, tuple(params.items()))
    assert run.evicted_any()
    out = cormlm.generate(cached_model(folder), torch.tensor([prompt]), max_new_tokens=NEW, cache=_cfg(policy, params),
                          eos_token_id=[])
    assert out.new_tokens[0] == run.new_tokens
    got = kept_positions(out.cache, LAYERS)
    assert got == run.kept, first_mismatch(got, run.kept)


@pytest.mark.parametrize("params", [dict(budget=0.5, window=64), dict(budget=0.9, window=64),
                                    dict(budget=56, recent=4, window=64), dict(budget=20, window=60)])
def test_scissorhands_long_window_matches_reference(params, folders):
    """80 tokens with a window of 60-64 queries: verdicts older than the window (or than a
    64-query history) must stop counting, newer ones must all count."""
    folder = folders["gqa"]
    prompt, run = _robust_case(folder, 40, 40, "scissorhands", tuple(params.items()))
    assert run.evicted_any()
    out = cormlm.generate(cached_model(folder), torch.tensor([prompt]), max_new_tokens=40,
                          cache=_cfg("scissorhands", params), eos_token_id=[])
    assert out.new_tokens[0] == run.new_tokens
    got = kept_positions(out.cache, LAYERS)
    assert got == run.kept, first_mismatch(got, run.kept)


@pytest.mark.parametrize("policy,params", [("h2o", dict(budget=0.5)), ("knorm", dict(budget=10))])
def test_alibi_falcon_rw_matches_reference(policy, params, falcon_rw):
    """Falcon-RW (ALiBi, MHA, interleaved QKV): kept keys keep their original-position bias;
    knorm's norms are of unrotated keys."""
    folder = falcon_rw
    prompt, run = _robust_case(folder, PROMPT, NEW, policy, tuple(params.items()))
    assert run.evicted_any()
    _assert_generation_matches(cached_model(folder), policy, params, prompt, run)


# ----------------------------------------------------------------------------------------
# Policy-level checks on cormlm (no reference model needed)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget,expected", [(0.3, 3), (0.25, 3), (0.35, 4), (0.05, 1), (1.0, 10)])
@pytest.mark.parametrize("policy", ["h2o", "knorm"])
def test_fraction_budget_rounding_after_prefill(policy, budget, expected, folders):
    """Prompt of 10, one eviction at t = 10: every head holds budget_t = floor(f * 10 + 0.5)."""
    folder = folders["gqa"]
    out = cormlm.generate(cached_model(folder), torch.tensor([random_prompt(10, 1, VOCAB)]), max_new_tokens=1,
                          cache=cormlm.CacheConfig(policy, budget=budget), eos_token_id=[])
    assert budget_at(budget, 10) == expected
    got = kept_positions(out.cache, LAYERS)
    assert all(len(head) == expected for layer in got for head in layer), got
    # the protected last budget_t // 2 positions are among them
    assert all(set(range(10 - expected // 2, 10)) <= set(head) for layer in got for head in layer), got


@pytest.mark.parametrize("policy,params", [
    ("h2o", dict(budget=6)), ("h2o", dict(budget=0.4, recent=5)), ("scissorhands", dict(budget=0.3, window=5)),
    ("scissorhands", dict(budget=9, recent=0)), ("knorm", dict(budget=0.6)), ("knorm", dict(budget=1)),
])
def test_budget_held_counts_every_step(policy, params, folders):
    """After the prefill and every decoding step, each head holds exactly the count the rule
    implies (min(previous + 1, max(budget_t, protected_t))) and every protected position."""
    folder = folders["gqa"]
    n, new = 14, 20
    prompt = random_prompt(n, 21, VOCAB)
    tokens = random_prompt(new, 22, VOCAB)
    _, _, kept_steps = _step_by_step(cached_model(folder), _cfg(policy, params), prompt, tokens)
    budget, recent = params.get("budget"), params.get("recent")
    expected = expected_held_counts(n, n + new, budget, recent)
    for step, kept in enumerate(kept_steps):
        t = n + step
        prot = protected_at(budget, recent, t)
        for layer in range(LAYERS):
            for head, held in enumerate(kept[layer]):
                assert len(held) == expected[t], f"t={t} layer {layer} head {head}: {held}"
                assert held == sorted(set(held)) and all(0 <= p < t for p in held)
                assert set(range(max(0, t - prot), t)) <= set(held), f"t={t}: protected keys gone"


@pytest.mark.parametrize("params", [dict(recent=5), dict(recent=0, sink=3), dict(budget=9), dict(budget=0.5, sink=2),
                                    dict(budget=3), dict(recent=4, sink=0)])
def test_streaming_keeps_exactly_sinks_and_window(params, folders):
    folder = folders["gqa"]
    n, new = 12, 14
    _, _, kept_steps = _step_by_step(cached_model(folder), cormlm.CacheConfig("streaming", **params), random_prompt(n, 5, VOCAB),
                                     random_prompt(new, 6, VOCAB))
    sink = params.get("sink", 4)
    for step, kept in enumerate(kept_steps):
        t = n + step
        r = streaming_recent_at(params.get("budget"), params.get("recent"), sink, t)
        want = [p for p in range(t) if p < sink or p >= t - r]
        for layer in range(LAYERS):
            for head, held in enumerate(kept[layer]):
                assert held == want, f"t={t} layer {layer} head {head}"


def test_evicted_keys_stay_gone(folders):
    """Whatever the policy, a position once evicted never comes back."""
    folder = folders["gqa"]
    for policy, params in [("h2o", dict(budget=0.5)), ("scissorhands", dict(budget=6)), ("knorm", dict(budget=0.4))]:
        _, _, kept_steps = _step_by_step(cached_model(folder), _cfg(policy, params), random_prompt(12, 8, VOCAB),
                                         random_prompt(12, 9, VOCAB))
        for layer in range(LAYERS):
            for head in range(2):
                for step in range(1, len(kept_steps)):
                    before, after = set(kept_steps[step - 1][layer][head]), set(kept_steps[step][layer][head])
                    assert after <= before | {12 + step - 1}, (policy, layer, head, step)


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["h2o", "scissorhands", "knorm"])
def test_budget_policies_need_a_budget(policy):
    with pytest.raises(CacheConfigError, match="budget"):
        cormlm.CacheConfig(policy)
    with pytest.raises(CacheConfigError, match="budget"):
        cormlm.CacheConfig(policy, recent=4)


@pytest.mark.parametrize("budget", [0, -3, 0.0, -0.5, 1.5, 2.0, True, False, "8", float("nan")])
@pytest.mark.parametrize("policy", ["h2o", "scissorhands", "knorm", "streaming"])
def test_bad_budget(policy, budget):
    with pytest.raises(CacheConfigError, match="budget"):
        cormlm.CacheConfig(policy, budget=budget)


def test_streaming_needs_exactly_one_of_budget_and_recent():
    for kwargs in (dict(), dict(budget=8, recent=4), dict(budget=0.5, recent=2)):
        with pytest.raises(CacheConfigError, match="budget") as info:
            cormlm.CacheConfig("streaming", **kwargs)
        assert "recent" in str(info.value)


def test_scissorhands_window_at_most_64():
    assert cormlm.CacheConfig("scissorhands", budget=8, window=64).window == 64
    with pytest.raises(CacheConfigError, match="window"):
        cormlm.CacheConfig("scissorhands", budget=8, window=65)
    with pytest.raises(CacheConfigError, match="window"):
        cormlm.CacheConfig("scissorhands", budget=8, window=0)


@pytest.mark.parametrize("policy,params", [("streaming", dict(recent=4)), ("h2o", dict(budget=8))])
def test_negative_sink_or_recent(policy, params):
    with pytest.raises(CacheConfigError, match="sink"):
        cormlm.CacheConfig(policy, sink=-1, **params)
    with pytest.raises(CacheConfigError, match="recent"):
        cormlm.CacheConfig(policy, **{**params, "recent": -1})


@pytest.mark.parametrize("policy,params,ignored", [
    ("full", dict(window=8), "window"), ("full", dict(budget=0.5), "budget"), ("corm", dict(block_size=8, sink=1), "sink"),
    ("corm", dict(sink=2), "sink"), ("h2o", dict(budget=8, window=4), "window"), ("knorm", dict(budget=8, sink=1), "sink"),
    ("streaming", dict(recent=4, window=8), "window"), ("scissorhands", dict(budget=8, sink=4), "sink")])
def test_a_parameter_the_policy_ignores_is_an_error(policy, params, ignored):
    """Silence is a bug: a parameter that would change nothing is refused, naming it and what the policy takes."""
    with pytest.raises(CacheConfigError, match=rf"policy '{policy}' does not use CacheConfig\.{ignored}; it takes"):
        cormlm.CacheConfig(policy, **params)


def test_valid_configs_construct():
    for policy, params in CASES:
        cfg = cormlm.CacheConfig(policy, **params)
        assert cfg.policy == policy
