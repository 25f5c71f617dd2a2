"""cormlm's CORM cache on Falcon checkpoints, against the independent reference.

tests/corm_reference.py reads Falcon checkpoints by their HF names (fused QKV layouts,
LayerNorm, gelu MLP, parallel or sequential residual, rotary or ALiBi) in float64. It is
first checked against transformers (SDPA attention: the eager Falcon path of transformers
5.23 adds the ALiBi bias twice); then cormlm must give the same greedy tokens and keep
exactly the same positions in every layer and KV head as the reference's literal CORM
rule, alone and, on the ALiBi model, in a left-padded ragged batch (under ALiBi each kept
key keeps the bias of its original position, however far the cache was compacted).

Checkpoints: tiny random Falcons whose q and k rows of query_key_value are scaled up (so
attention is peaky and CORM really evicts) and whose LayerNorm weights / biases and linear
biases are randomised (transformers initialises them to 1 / 0, which would hide a missing
one). As in test_corm.py, every deterministic case uses a prompt on which no attention
weight lies within 1e-4 (relative) of its 1/t threshold and no greedy choice within 1e-4
of a tie, so fp32 (cormlm) vs float64 (reference) rounding cannot flip a decision.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cache_cases import cached_model, first_mismatch, kept_positions, left_pad, random_prompt, robust_corm_case
from checkpoints import load_hf_model, save_hf_model
from corm_reference import long_term_minor, reference_generate, reference_logits, reference_run
from safetensors.torch import load_file, save_file

import cormlm

VOCAB, HIDDEN, LAYERS = 160, 64, 2
PEAKY = 3.0  # scale of the q and k rows of query_key_value

# name -> (config overrides, KV heads, fused QKV layout); 4 heads unless overridden
LAYOUTS = {
    # Falcon-7B: one k and one v head after all the q heads, parallel residual, rotary
    "7b": (dict(multi_query=True, parallel_attn=True, new_decoder_architecture=False, alibi=False), 1,
           "multi_query"),
    # Falcon-RW: interleaved [q, k, v] per head, sequential residual, ALiBi, biases
    "rw": (dict(alibi=True, multi_query=False, parallel_attn=False, new_decoder_architecture=False, bias=True),
           4, "interleaved"),
    # Falcon-RW with 16 heads: slopes 2^(-k/2) are not powers of two, so transformers'
    # bfloat16 rounding of slopes and of slope * position really matters
    "rw16": (dict(alibi=True, multi_query=False, parallel_attn=False, bias=True, num_attention_heads=16,
                  max_position_embeddings=512), 16,
             "interleaved"),
    # Falcon-40B/180B: grouped [q, q, k, v] per KV head, ln_attn + ln_mlp, rotary
    "new": (dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True), 2, "grouped"),
}
WINDOWS = [(4, 2), (8, 4), (6, 10)]  # (w, r); r > w included


def _heads(name: str) -> int:
    return LAYOUTS[name][0].get("num_attention_heads", 4)


def _qk_rows(layout: str, heads: int, kv_heads: int) -> torch.Tensor:
    """Boolean mask over the rows of query_key_value: True on the q and k rows."""
    d = HIDDEN // heads
    if layout == "multi_query":
        rows = (heads + 2) * d
        return torch.arange(rows) < (heads + 1) * d
    if layout == "interleaved":
        return (torch.arange(3 * heads * d) // d) % 3 < 2
    per = heads // kv_heads
    return (torch.arange((per + 2) * kv_heads * d) // d) % (per + 2) < per + 1


def make_falcon_checkpoint(folder: Path, name: str, factor: float = PEAKY, seed: int = 0) -> Path:
    overrides, kv_heads, layout = LAYOUTS[name]
    save_hf_model(folder, model_type="falcon", **overrides)
    path = folder / "model.safetensors"
    weights = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    qk = _qk_rows(layout, _heads(name), kv_heads)
    for key in list(weights):
        tensor = weights[key]
        if "norm" in key or ".ln_" in key:  # LayerNorms: weight around 1, bias around 0
            base = 1.0 if key.endswith(".weight") else 0.0
            tensor = base + 0.1 * torch.randn(tensor.shape, generator=gen)
        elif key.endswith(".bias"):  # linear biases (bias=True only)
            tensor = 0.05 * torch.randn(tensor.shape, generator=gen)
        if "query_key_value" in key:
            assert tensor.shape[0] == qk.numel(), key
            scale = torch.where(qk, factor, 1.0)
            tensor = tensor * (scale[:, None] if tensor.dim() == 2 else scale)
        weights[key] = tensor.to(torch.float32).contiguous()
    save_file(weights, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return {name: make_falcon_checkpoint(tmp_path_factory.mktemp(f"falcon_{name}"), name) for name in LAYOUTS}


def _robust_case(folder: Path, length: int, new: int, window: int, recent: int, seed: int = 0):
    return robust_corm_case(folder, length, new, window, recent, VOCAB, seed)


def _corm(window: int, recent: int) -> cormlm.CacheConfig:
    return cormlm.CacheConfig(policy="corm", window=window, recent=recent)


def _evicted_fraction(kept: list[list[list[int]]], seen: int) -> float:
    heads = [head for layer in kept for head in layer]
    return 1.0 - sum(map(len, heads)) / (seen * len(heads))


# ----------------------------------------------------------------------------------------
# The reference itself
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_reference_forward_matches_transformers_sdpa(name, folders):
    folder = folders[name]
    ids = random_prompt(40, 7, VOCAB)
    with torch.inference_mode():
        expected = load_hf_model(folder)(torch.tensor([ids])).logits[0].double()
    diff = (reference_logits(folder, ids) - expected).abs().max().item()
    assert diff <= 1e-4, f"{name}: reference vs transformers (sdpa) max abs diff {diff}"


def test_reference_alibi_forward_matches_transformers_left_padded(folders):
    """ALiBi positions count from the row's first real token: a left-padded row equals the
    prompt alone (transformers builds positions as cumsum(mask) - 1)."""
    folder = folders["rw"]
    prompts = [random_prompt(n, 50 + n, VOCAB) for n in (31, 17)]
    ids, mask = left_pad(prompts)
    with torch.inference_mode():
        out = load_hf_model(folder)(ids, attention_mask=mask).logits.double()
    for row, prompt in enumerate(prompts):
        diff = (reference_logits(folder, prompt) - out[row, ids.shape[1] - len(prompt):]).abs().max().item()
        assert diff <= 1e-4, f"row {row}: max abs diff {diff}"


def test_alibi_bias_matters(folders):
    """The ALiBi checkpoint really depends on key positions (so a wrong position would show)."""
    from corm_reference import load_reference

    model = load_reference(folders["rw"])
    assert model.alibi and model.key_bias(torch.arange(30)).abs().max() > 0.5
    # with 16 heads the bf16 rounding of transformers' ALiBi is not a no-op
    model16 = load_reference(folders["rw16"])
    pos = torch.arange(300, dtype=torch.float64)
    exact = (2.0 ** (-0.5 * torch.arange(1, 17, dtype=torch.float64)))[:, None] * pos / 2.0
    assert (model16.key_bias(torch.arange(300)) - exact).abs().max() > 1e-2


def test_reference_alibi_bf16_positions_beyond_256(folders):
    """Positions past 256 are no longer exact in bfloat16: still transformers' logits."""
    folder = folders["rw16"]
    ids = random_prompt(300, 3, VOCAB)
    with torch.inference_mode():
        expected = load_hf_model(folder)(torch.tensor([ids])).logits[0].double()
    diff = (reference_logits(folder, ids) - expected).abs().max().item()
    assert diff <= 1e-4, f"reference vs transformers (sdpa) max abs diff {diff}"


def test_full_cache_alibi_beyond_256_matches_reference(folders):
    """cormlm on the 16-head ALiBi model at positions past 256, where transformers' bfloat16
    slopes and products move the logits by ~0.1: same logits as the reference, same tokens."""
    folder = folders["rw16"]
    model = cached_model(folder)
    prompt = random_prompt(290, 100, VOCAB)
    with torch.inference_mode():
        got = model(torch.tensor([prompt]), cache=cormlm.make_cache(model, cormlm.CacheConfig("full"), batch_size=1))
    diff = (got[0].double() - reference_logits(folder, prompt)).abs().max().item()
    assert diff <= 1e-4, f"prefill logits, max abs diff {diff}"
    run = reference_run(folder, prompt, 12, window=None, recent=None)
    assert run.logit_gap >= 1e-4
    out = cormlm.generate(model, torch.tensor([prompt]), max_new_tokens=12, cache=cormlm.CacheConfig("full"),
                          eos_token_id=[])
    assert out.new_tokens[0] == run.new_tokens


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_reference_without_eviction_is_plain_greedy(name, folders):
    folder = folders[name]
    prompt = random_prompt(20, 11, VOCAB)
    with torch.inference_mode():
        expected = load_hf_model(folder).generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
    tokens, kept = reference_generate(folder, prompt, 10, window=None, recent=None)
    assert tokens == expected[0, 20:].tolist()
    assert kept == [[list(range(29))] * LAYOUTS[name][1]] * LAYERS


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_reference_evicts_by_the_rule(name, folders):
    """Self-check: every eviction was long-term minor and old enough, and eviction is substantial."""
    folder = folders[name]
    for window, recent in WINDOWS:
        _, run = _robust_case(folder, 30, 20, window, recent)
        assert _evicted_fraction(run.kept, run.seen) > 0.1, (window, recent)
        for layer in range(LAYERS):
            for head in range(LAYOUTS[name][1]):
                mat = run.important[layer][head]
                for t, key in run.evictions[layer][head]:
                    assert key <= t - recent and long_term_minor(mat, t, window, key)


# ----------------------------------------------------------------------------------------
# cormlm against the reference
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_full_cache_matches_reference_without_eviction(name, folders):
    folder = folders[name]
    prompt = random_prompt(24, 5, VOCAB)
    tokens, kept = reference_generate(folder, prompt, 16, window=None, recent=None)
    out = cormlm.generate(cached_model(folder), torch.tensor([prompt]), max_new_tokens=16,
                          cache=cormlm.CacheConfig("full"), eos_token_id=[])
    assert out.new_tokens[0] == tokens
    assert kept_positions(out.cache, LAYERS) == kept


@pytest.mark.parametrize("window,recent", WINDOWS)
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_corm_generation_matches_reference(name, window, recent, folders):
    folder = folders[name]
    length = {4: 24, 8: 32, 6: 28}[window]
    prompt, run = _robust_case(folder, length, 20, window, recent)
    assert _evicted_fraction(run.kept, run.seen) > 0.1, "the reference barely evicted: the test has no teeth"
    out = cormlm.generate(cached_model(folder), torch.tensor([prompt]), max_new_tokens=20, cache=_corm(window, recent),
                          eos_token_id=[])
    assert out.new_tokens[0] == run.new_tokens
    got = kept_positions(out.cache, LAYERS)
    assert got == run.kept, first_mismatch(got, run.kept)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_corm_step_logits_match_reference(name, folders):
    """Through make_cache + model(): every step's logits (attention over the kept keys only,
    under ALiBi with each kept key's original-position bias)."""
    folder = folders[name]
    window, recent = 6, 3
    prompt, run = _robust_case(folder, 26, 18, window, recent)
    model = cached_model(folder)
    cache = cormlm.make_cache(model, _corm(window, recent), batch_size=1)
    with torch.inference_mode():
        got = [model(torch.tensor([prompt]), cache=cache)[0, -1]]
        for token in run.new_tokens[:-1]:
            got.append(model(torch.tensor([[token]]), cache=cache)[0, -1])
    for step, (ours, ref) in enumerate(zip(got, run.step_logits)):
        diff = (ours.double() - ref).abs().max().item()
        assert diff <= 1e-4, f"step {step}: max abs diff {diff}"
    assert kept_positions(cache, LAYERS) == run.kept
    # the eviction really changed what attention saw (so the comparison above has teeth)
    full = reference_logits(folder, prompt + run.new_tokens[:-1])[len(prompt) - 1 :]
    assert max((full[k] - run.step_logits[k]).abs().max().item() for k in range(len(run.step_logits))) > 1e-3


@pytest.mark.parametrize("name", ["new", "rw", "rw16"])
def test_ragged_batch_rows_equal_reference_alone(name, folders):
    """Left-padded batch of 3 prompt lengths: each row is the reference run alone. On the
    ALiBi model this checks the bias follows each row's own (unpadded, original) positions
    after the rows' caches were compacted differently."""
    folder = folders[name]
    window, recent, new = 6, 3, 16
    cases = [_robust_case(folder, length, new, window, recent, seed=7) for length in (30, 21, 12)]
    ids, mask = left_pad([prompt for prompt, _ in cases])
    out = cormlm.generate(cached_model(folder), ids, attention_mask=mask, max_new_tokens=new, cache=_corm(window, recent),
                          eos_token_id=[])
    for row, (_, run) in enumerate(cases):
        assert _evicted_fraction(run.kept, run.seen) > 0.1
        assert out.new_tokens[row] == run.new_tokens, f"row {row}"
        got = kept_positions(out.cache, LAYERS, row)
        assert got == run.kept, f"row {row}: {first_mismatch(got, run.kept)}"
