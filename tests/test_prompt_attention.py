"""The C kernel for a prompt's causal attention: equal to the rule written naively in float64,
each query's result independent of which heads and rows share its call, chosen by
measurement, and never the only way (a forced path, shapes and dtypes it does not take)."""

from __future__ import annotations

import pytest
import torch
from trial_state import fresh_trials

from cormlm.errors import InputError
from cormlm.models import prompt_attention
from cormlm.models.attention_ops import AttentionSpec, attend, attend_causal_with_lse
from cormlm.trials import TRIALS

_real_run = prompt_attention.run
pytestmark = pytest.mark.skipif(not prompt_attention.available(), reason="no C compiler to build the kernel with")


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    fresh_trials(monkeypatch, prompt_attention)


def fused_heads(batch: int, heads: int, kv_heads: int, length: int, head_dim: int, seed: int):
    """Queries, keys and values as the model hands them over: strided views of one fused
    projection [B, T, heads + 2 kv heads, D] (positions a whole row apart)."""
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(batch, length, heads + 2 * kv_heads, head_dim, generator=g)
    q, k, v = fused.split((heads, kv_heads, kv_heads), dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def naive_causal(q, k, v, scale):
    """The rule in float64: query t of head h attends keys 0..t of KV head h // G."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scale
    t = q.shape[2]
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


SHAPES = [(1, 1, 1, 1, 64), (1, 4, 4, 5, 64), (2, 6, 2, 63, 64), (1, 9, 3, 65, 64), (3, 9, 3, 130, 64),
          (1, 8, 1, 200, 64), (1, 70, 1, 9, 64), (2, 4, 2, 77, 24), (1, 2, 1, 129, 128)]


@pytest.mark.parametrize("batch,heads,kv_heads,length,head_dim", SHAPES)
@torch.inference_mode()
def test_kernel_equals_the_rule(batch, heads, kv_heads, length, head_dim):
    q, k, v = fused_heads(batch, heads, kv_heads, length, head_dim, seed=length)
    scale = head_dim**-0.5
    expected, expected_lse = naive_causal(q, k, v, scale)
    out, lse = prompt_attention.run(q, k, v, scale, with_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=2e-5, rtol=1e-5)
    alone, none = prompt_attention.run(q, k, v, scale, with_lse=False)
    assert none is None and torch.equal(alone, out)
    # laid out as the output projection reads it: [B, T, Hq, D] in memory
    assert out.transpose(1, 2).is_contiguous()


@torch.inference_mode()
def test_a_query_rounds_alike_whatever_shares_its_call():
    """Tensor-parallel ranks hold a share of the heads and a server batches other prompts: a
    query's output must not depend on either, to the bit."""
    q, k, v = fused_heads(2, 12, 4, 150, 64, seed=3)
    out, lse = prompt_attention.run(q, k, v, 0.125, with_lse=True)
    share, share_lse = prompt_attention.run(q[1:, 3:6], k[1:, 1:2], v[1:, 1:2], 0.125, with_lse=True)
    assert torch.equal(share, out[1:, 3:6]) and torch.equal(share_lse, lse[1:, 3:6])
    shorter, _ = prompt_attention.run(q[:, :, :97], k[:, :, :97], v[:, :, :97], 0.125, with_lse=True)
    assert torch.equal(shorter, out[:, :, :97])  # a query never sees past itself


@torch.inference_mode()
def test_the_8_lane_build_equals_the_rule(narrow_vectors):
    narrow_vectors(prompt_attention.KERNEL)
    narrow_vectors(prompt_attention.WORK)
    q, k, v = fused_heads(2, 6, 2, 100, 64, seed=5)
    expected, expected_lse = naive_causal(q, k, v, 0.125)
    out, lse = prompt_attention.run(q, k, v, 0.125, with_lse=True)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=2e-5, rtol=1e-5)


@torch.inference_mode()
def test_each_shape_is_decided_by_trials_then_kept(monkeypatch):
    q, k, v = fused_heads(1, 6, 2, 70, 64, seed=7)
    spec = AttentionSpec(num_heads=6, num_kv_heads=2, head_dim=64, scale=0.125)
    ran = []
    monkeypatch.setattr(prompt_attention, "run", lambda *a, **kw: ran.append("native") or _real_run(*a, **kw))
    expected = naive_causal(q, k, v, 0.125)[0]
    for _ in range(2 * (TRIALS + 1)):
        torch.testing.assert_close(attend(q, k, v, spec, causal=True).double(), expected, atol=2e-6, rtol=1e-5)
    assert ran.count("native") == TRIALS + 1  # the two paths alternated, each run TRIALS + 1 times
    (key, choice), = prompt_attention._choices.items()
    assert key == (1, 6, 2, 128, 64, "", torch.get_num_threads()) and choice in prompt_attention.PATHS
    before = len(ran)
    for _ in range(3):
        attend(q, k, v, spec, causal=True)
    assert len(ran) - before == (3 if choice == "native" else 0)
    assert prompt_attention.kernel_status() == [f"batch 1, 6 heads over 2, up to 128 positions, head 64, "
                                                f"{torch.get_num_threads()} thread"
                                                f"{'s' * (torch.get_num_threads() > 1)}: {choice}"]


@pytest.mark.parametrize("forced", ["native", "sdpa"])
@torch.inference_mode()
def test_a_forced_path_runs_everywhere_it_fits(monkeypatch, forced):
    monkeypatch.setenv(prompt_attention.FORCE_ENV, forced)
    q, k, v = fused_heads(1, 4, 2, 40, 64, seed=8)
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=64, scale=0.125)
    ran = []
    monkeypatch.setattr(prompt_attention, "run", lambda *a, **kw: ran.append(1) or _real_run(*a, **kw))
    out, lse = attend_causal_with_lse(q, k, v, spec)
    assert lse is not None and len(ran) == (forced == "native") and not prompt_attention._choices
    expected, expected_lse = naive_causal(q, k, v, 0.125)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=2e-5, rtol=1e-5)


def test_a_misspelt_path_is_an_error_naming_both(monkeypatch):
    monkeypatch.setenv(prompt_attention.FORCE_ENV, "flash")
    q, k, v = fused_heads(1, 2, 1, 8, 64, seed=9)
    with torch.inference_mode(), pytest.raises(InputError, match="CORMLM_PROMPT_ATTENTION='flash'.*native, sdpa"):
        attend(q, k, v, AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=64, scale=0.125), causal=True)


def test_calls_the_kernel_does_not_take_run_sdpa(monkeypatch):
    monkeypatch.setenv(prompt_attention.FORCE_ENV, "native")
    monkeypatch.setattr(prompt_attention, "run", lambda *a, **kw: pytest.fail("the kernel ran a call it does not take"))
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=64, scale=0.125)
    q, k, v = fused_heads(1, 4, 2, 30, 64, seed=10)
    grad_q = q.detach().clone().requires_grad_()  # a gradient: SDPA, which autograd differentiates
    attend(grad_q, k, v, spec, causal=True).sum().backward()
    assert grad_q.grad is not None
    with torch.inference_mode():
        half = [x.bfloat16() for x in (q, k, v)]
        assert attend(*half, spec, causal=True).dtype == torch.bfloat16
        windowed = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=64, scale=0.125, sliding_window=7)
        out, lse = attend_causal_with_lse(q, k, v, windowed)
        assert lse is None
        positions = torch.arange(30)[None]
        torch.testing.assert_close(out, attend(q, k, v, windowed, positions, positions))


@torch.inference_mode()
def test_a_model_prompt_agrees_under_both_paths(monkeypatch):
    """The embedded toy model's prompt logits and CORM's kept keys under either path."""
    import cormlm
    from cormlm.checkpoint.embedded import embedded_model_path

    model = cormlm.load_model(embedded_model_path())
    ids = torch.randint(0, model.config.vocab_size, (2, 90), generator=torch.Generator().manual_seed(11))
    results = {}
    for path in prompt_attention.PATHS:
        monkeypatch.setenv(prompt_attention.FORCE_ENV, path)
        cache = cormlm.make_cache(model, cormlm.CacheConfig("corm", window=16, recent=16), batch_size=2)
        results[path] = model(ids, cache=cache), cache.stats().retained_tokens
    (native_logits, native_kept), (sdpa_logits, sdpa_kept) = results["native"], results["sdpa"]
    torch.testing.assert_close(native_logits, sdpa_logits, atol=1e-4, rtol=1e-4)
    assert native_kept == sdpa_kept


@pytest.mark.parametrize("rows", [1, 7, 64, 130])
@pytest.mark.parametrize("group_max", [False, True])
@torch.inference_mode()
def test_the_scored_rows_log_probabilities_equal_the_rule(rows, group_max):
    """What a policy reads of a prompt's last rows, from the kernel's own pass: their natural-log
    probabilities over every key [B, Hkv, G, rows, T] (or the group's maximum, [B, Hkv, 1,
    rows, T]), -inf where the key comes after the query (and exactly 0 for a first query, which
    sees its own key alone)."""
    q, k, v = fused_heads(2, 6, 2, 130, 64, seed=rows)
    scratch = torch.full((2 * 6 * rows * 130 + 5,), float("nan"))
    out, log_probs = prompt_attention.run_scored(q, k, v, 0.125, rows, group_max, scratch)
    assert log_probs.data_ptr() == scratch.data_ptr()
    assert torch.equal(out, prompt_attention.run(q, k, v, 0.125, with_lse=False)[0])
    scores = q.double() @ k.double().repeat_interleave(3, dim=1).transpose(-1, -2) * 0.125
    scores.masked_fill_(torch.ones(130, 130, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.log_softmax(scores, dim=-1)[:, :, -rows:].reshape(2, 2, 3, rows, 130)
    if group_max:
        expected = expected.amax(dim=2, keepdim=True)
    assert log_probs.shape == expected.shape and log_probs.dtype == torch.float32
    assert torch.equal(torch.isneginf(log_probs), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(log_probs.double()[finite], expected[finite], atol=2e-5, rtol=1e-5)
    if rows == 130:
        assert (log_probs[..., 0, 0] == 0).all()
