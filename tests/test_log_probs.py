"""Policies that read log-probabilities (CORM): SDPA's log-sum-exp as a by-product of a prompt's
attention, scored rows as scores minus it, and CORM's threshold test in logarithms deciding
what its test on probabilities decides."""

from __future__ import annotations

import math

import pytest
import torch
from checkpoints import save_hf_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cormlm
import cormlm.models.attention_ops as attention_ops
from cormlm.cache.corm import CormPolicy
from cormlm.cache.policy import EvictionPolicy, group_max_
from cormlm.cache.ragged import explicit_log_probs, explicit_probs
from cormlm.errors import CacheConfigError
from cormlm.models import prompt_attention
from cormlm.models.attention_ops import AttentionSpec, attend, attend_causal_with_lse


@pytest.fixture(autouse=True)
def _sdpa_prompts(monkeypatch):
    """These tests hold SDPA's flash kernel to its log-sum-exp: prompts take PyTorch's path
    (cormlm's own kernel is tested in test_prompt_attention.py)."""
    monkeypatch.setenv(prompt_attention.FORCE_ENV, "sdpa")


def _qkv(b=2, hkv=3, g=3, t=40, d=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, t, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hkv, t, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hkv, t, d, generator=gen, dtype=dtype)
    return q, k, v, AttentionSpec(hkv * g, hkv, d, d ** -0.5)


@pytest.mark.parametrize("g", [1, 3])
@torch.inference_mode()
def test_causal_attention_gives_sdpa_output_and_each_rows_log_sum_exp(g):
    q, k, v, spec = _qkv(g=g)
    out, lse = attend_causal_with_lse(q, k, v, spec)
    assert torch.equal(out, attend(q, k, v, spec, causal=True))  # the very kernel SDPA runs
    assert lse is not None and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    scores = (q.double() @ k.double().repeat_interleave(g, dim=1).transpose(-1, -2)) * spec.scale
    scores.masked_fill_(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_masked_attention_and_a_refusing_kernel_give_no_log_sum_exp(monkeypatch):
    q, k, v, spec = _qkv()
    windowed = AttentionSpec(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.scale, sliding_window=8)
    out, lse = attend_causal_with_lse(q, k, v, windowed)
    assert lse is None and torch.equal(out, attend(q, k, v, windowed, causal=True))

    def refuse(*args, **kwargs):
        raise RuntimeError("not on this build")

    monkeypatch.setattr(attention_ops, "_FLASH_CPU", refuse)
    monkeypatch.setattr(attention_ops, "_flash_lse_broken", False)
    out, lse = attend_causal_with_lse(q, k, v, spec)
    assert lse is None and torch.equal(out, attend(q, k, v, spec, causal=True))
    assert attention_ops._flash_lse_broken  # never offered again


@pytest.mark.parametrize("start", [0, 25])
@torch.inference_mode()
def test_scores_minus_sdpa_log_sum_exp_are_the_log_probabilities(start):
    q, k, v, spec = _qkv()
    _, lse = attend_causal_with_lse(q, k, v, spec)
    rows = slice(start, 40)
    positions = torch.arange(40).expand(2, 40)
    keys_t = k.transpose(-1, -2).contiguous()
    probs, seen = explicit_probs(q[:, :, rows], keys_t, positions[:, rows], positions, spec, start)
    logs, logs_seen = explicit_log_probs(q[:, :, rows], keys_t, positions[:, rows], positions, spec, start,
                                         lse[:, :, rows])
    fallback, _ = explicit_log_probs(q[:, :, rows], keys_t, positions[:, rows], positions, spec, start)
    assert torch.equal(seen, logs_seen)
    hidden = ~seen[:, :, None].expand_as(logs)
    assert torch.isneginf(logs[hidden]).all() and torch.isneginf(fallback[hidden]).all()
    torch.testing.assert_close(logs.exp(), probs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fallback.exp(), probs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape, dim", [((5, 1, 4), 1), ((5, 3, 1, 4), -3), ((2, 8, 3), 1), ((4, 6), 0)])
def test_group_max_in_place_equals_amax(shape, dim):
    x = torch.randn(shape, dtype=torch.float64)
    want = x.amax(dim=dim, keepdim=True)
    got = group_max_(x, dim)
    assert torch.equal(got, want) and got.data_ptr() == x.data_ptr()  # a view of the input, overwritten


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), g=st.integers(1, 4), q=st.integers(1, 6), s=st.integers(1, 24),
       threshold=st.sampled_from([1.0, 0.5, 0.1]), magnitude=st.sampled_from([None, 1.0, 3.0]),
       spread=st.floats(0.5, 6.0))
def test_corm_decides_alike_from_log_probabilities(seed, g, q, s, threshold, magnitude, spread):
    """observe_log(log p) marks what observe(p) marks, for any group, rows (padding included)
    and keys, wherever no probability lies within 1e-4 (relative) of its threshold alpha/t."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 2, g, q, s, generator=gen, dtype=torch.float64) * spread
    query_t = torch.randint(0, 30, (2, 2, q), generator=gen)  # 0: a padding query
    policy = CormPolicy(window=7, recent=0, threshold=threshold, magnitude=magnitude)
    probs = torch.softmax(scores, dim=-1)
    bar = threshold / query_t.double()[..., None, :, None]
    if ((probs - bar).abs() <= 1e-4 * bar).any():
        return  # a near tie: rounding may decide it either way
    want = policy.observe(probs.float(), query_t, None, None)["keep_until"]
    got = policy.observe_log(torch.log_softmax(scores, dim=-1).float(), query_t, None, None)["keep_until"]
    if magnitude is None:
        assert torch.equal(got, want)
    else:  # a strong mark's lifetime comes from log2 of its share: the same up to rounding
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_only_policies_overriding_observe_log_read_log_probabilities():
    assert CormPolicy.reads_log_probs()
    assert not any(cls.reads_log_probs() for name, cls in cormlm.cache.policy.POLICIES.items() if name != "corm")
    probs = torch.softmax(torch.randn(1, 1, 2, 3, 5), dim=-1)
    base = EvictionPolicy()
    assert base.observe_log(probs.log(), torch.ones(1, 1, 3), None, None) == base.observe(probs, None, None, None)


def test_a_policy_summing_its_group_cannot_read_log_probabilities():
    with pytest.raises(CacheConfigError, match="log-probabilities.*'sum'"):
        class SumOfLogs(EvictionPolicy):  # noqa: F841 (defining it is the test)
            group_reduce = "sum"

            def observe_log(self, log_probs, query_t, attended, visible):
                return {}


@pytest.fixture(scope="module")
def peaky_gqa(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    folder = save_hf_model(tmp_path_factory.mktemp("gqa"), num_key_value_heads=2, max_position_embeddings=1024)
    path = folder / "model.safetensors"
    tensors = {name: tensor * (4.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0)
               for name, tensor in load_file(path).items()}
    save_file(tensors, path)
    return cormlm.load_model(folder)


def _kept_state(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: the live keys' positions and CORM state, in the pool's dense order."""
    kept = []
    for pool in cache.pools:
        _, _, positions, slots = pool.gather_dense()
        held = slots >= 0
        kept.append((positions[held], pool.state["keep_until"].view(-1)[slots.clamp(min=0)][held]))
    return kept


@pytest.mark.parametrize("path", prompt_attention.PATHS)
@pytest.mark.parametrize("magnitude", [None, 1.0])
@torch.inference_mode()
def test_a_corm_prompt_scored_by_either_kernel_keeps_what_the_softmax_keeps(peaky_gqa, monkeypatch, magnitude, path):
    """A prompt under CORM takes its rows' log-probabilities from cormlm's prompt kernel's own
    pass (native) or their scores less SDPA's log-sum-exp (sdpa), and keeps the same keys
    with the same marks as when every scored row goes through a softmax."""
    if path == "native" and not prompt_attention.available():
        pytest.skip("no C compiler to build the prompt kernel with")
    monkeypatch.setenv(prompt_attention.FORCE_ENV, path)
    ids = torch.randint(0, 160, (1, 60), generator=torch.Generator().manual_seed(5))
    cfg = cormlm.CacheConfig("corm", window=12, recent=4, magnitude=magnitude)
    calls = []
    flash, scored = attention_ops._FLASH_CPU, prompt_attention.run_scored
    monkeypatch.setattr(attention_ops, "_FLASH_CPU", lambda *a, **kw: calls.append("sdpa") or flash(*a, **kw))
    monkeypatch.setattr(prompt_attention, "run_scored", lambda *a, **kw: calls.append("native") or scored(*a, **kw))
    cache = cormlm.make_cache(peaky_gqa, cfg, batch_size=1)
    fast_logits = peaky_gqa(ids, cache=cache)
    fast = _kept_state(cache)
    assert calls == [path] * peaky_gqa.config.num_layers
    assert cache._scores is None  # the step's score scratch is freed with the step, never held
    monkeypatch.setattr(CormPolicy, "observe_log", EvictionPolicy.observe_log)  # a probabilities policy again
    monkeypatch.setattr(CormPolicy, "reads_log_probs", classmethod(lambda cls: False))
    cache = cormlm.make_cache(peaky_gqa, cfg, batch_size=1)
    slow_logits = peaky_gqa(ids, cache=cache)
    assert len(calls) == peaky_gqa.config.num_layers  # no log-sum-exp or log-probabilities asked for
    slow = _kept_state(cache)
    assert sum(len(p) for p, _ in fast) < peaky_gqa.config.num_kv_heads * 60 * len(fast), "nothing evicted"
    assert torch.equal(fast_logits, slow_logits)
    for (pos, until), (pos2, until2) in zip(fast, slow):
        assert torch.equal(pos, pos2)
        torch.testing.assert_close(until, until2, rtol=0, atol=0 if magnitude is None else 1e-3)
    assert math.isfinite(float(fast_logits.abs().max()))
