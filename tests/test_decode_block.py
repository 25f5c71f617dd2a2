"""The native decode block (``decode_block.c``: a block's dense work in two C calls) against
the modules it stands in for, and which calls take it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import cormlm
from cormlm.config import ModelConfig, RopeConfig
from cormlm.errors import InputError
from cormlm.models import decode_block
from cormlm.models.linear import FORCE_ENV as LINEAR_ENV
from cormlm.models.transformer import CausalLM
from cormlm.trials import TRIALS

# widths off every vector length (72, 100, 12-wide heads), grouped queries
BASE = ModelConfig(family="llama", vocab_size=96, hidden_size=72, num_layers=2, num_heads=6, num_kv_heads=2,
                   head_dim=12, intermediate_size=100, max_position_embeddings=256, norm_eps=1e-5)
VARIANTS = {
    "gqa": BASE,
    "biases": dataclasses.replace(BASE, attention_bias=True, attention_out_bias=True, mlp_bias=True),
    "mha-partial-rotary": dataclasses.replace(BASE, num_kv_heads=6, rope=RopeConfig(partial_rotary_factor=0.5)),
    "mqa-window": dataclasses.replace(BASE, num_kv_heads=1, sliding_window=4),
}


def random_model(config: ModelConfig, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or parameter.dim() == 1:  # norm weights and biases: not their defaults
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter) if "norm" in name else 0.2 * torch.randn_like(parameter))
    model.reset_derived_buffers()
    return model.eval()


def skip_without_kernels() -> None:
    for kernel in (decode_block.PRE, decode_block.POST):
        if kernel.function() is None:
            pytest.skip(f"no C kernel here: {kernel.unavailable}")


def counted(monkeypatch, plans: list[int] | None = None) -> list[str]:
    """Records each C call of the block (its name; its products' plans, its last argument, into
    ``plans``), and still makes it."""
    calls: list[str] = []
    seen = plans if plans is not None else []
    for name, kernel in (("pre", decode_block.PRE), ("post", decode_block.POST)):
        real = kernel.function()
        monkeypatch.setattr(kernel, "function", lambda real=real, name=name: (
            lambda *a: calls.append(name) or seen.append(a[-1]) or real(*a)))
    return calls


def decode(model: CausalLM, ids: torch.Tensor, steps: int, policy: cormlm.CacheConfig | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and every step's logits after a prompt, with a cache."""
    with torch.inference_mode():
        cache = cormlm.make_cache(model, policy or cormlm.CacheConfig(), batch_size=ids.shape[0])
        logits = model(ids, cache=cache, last_logits_only=True)[:, -1]
        tokens, every = [], [logits]
        for _ in range(steps):
            tokens.append(logits.argmax(-1, keepdim=True))
            logits = model(tokens[-1], cache=cache)[:, -1]
            every.append(logits)
    return torch.cat(tokens, dim=1), torch.stack(every)


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    """Each test measures (or forces) its own block paths."""
    for name in ("_choices", "_trials", "_graph_choices"):
        monkeypatch.setattr(decode_block, name, {})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("kernel", ["rows", "rows_l2"])
def test_decode_steps_equal_the_modules(monkeypatch, variant, batch, kernel):
    """Every decode step of a batch of up to 8 rows through the two C calls, by either plan of
    the few-row kernel (the plan its products' kernel has), gives the logits and greedy tokens
    of the modules' own operations."""
    skip_without_kernels()
    monkeypatch.setenv(decode_block.FORCE_ENV, "native")
    monkeypatch.setenv(LINEAR_ENV, kernel)
    model = random_model(VARIANTS[variant], seed=batch)
    ids = torch.randint(0, BASE.vocab_size, (batch, 11))
    plans: list[int] = []
    calls = counted(monkeypatch, plans)
    native_tokens, native_logits = decode(model, ids, steps=6)
    assert calls.count("pre") == calls.count("post") == 6 * BASE.num_layers  # every decode step, no prompt
    assert set(plans) == {0b1111 if kernel == "rows_l2" else 0}
    monkeypatch.setenv(decode_block.FORCE_ENV, "torch")
    modules_tokens, modules_logits = decode(model, ids, steps=6)
    assert len(calls) == 12 * BASE.num_layers
    torch.testing.assert_close(native_logits, modules_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(native_tokens, modules_tokens)


@pytest.mark.parametrize("policy", [cormlm.CacheConfig("corm", window=8, recent=8),
                                    cormlm.CacheConfig("h2o", budget=24)], ids=["corm", "h2o"])
def test_evicting_policies_see_the_same_decoding(monkeypatch, policy):
    """The block's C calls leave the cache's attention and the policy's bookkeeping to the
    cache: an evicting policy decodes the same tokens either way."""
    skip_without_kernels()
    monkeypatch.setenv(decode_block.FORCE_ENV, "native")
    model = random_model(VARIANTS["gqa"], seed=5)
    ids = torch.randint(0, BASE.vocab_size, (2, 40))
    native = decode(model, ids, steps=12, policy=policy)
    monkeypatch.setenv(decode_block.FORCE_ENV, "torch")
    modules = decode(model, ids, steps=12, policy=policy)
    assert torch.equal(native[0], modules[0])
    torch.testing.assert_close(native[1], modules[1], rtol=1e-4, atol=1e-4)


def test_the_8_lane_build_equals_the_modules(monkeypatch, narrow_vectors):
    """The AVX2 / NEON vector width (8 lanes), built on this machine."""
    narrow_vectors(decode_block.PRE)
    narrow_vectors(decode_block.POST)
    monkeypatch.setenv(decode_block.FORCE_ENV, "native")
    model = random_model(VARIANTS["biases"], seed=3)
    ids = torch.randint(0, BASE.vocab_size, (5, 9))
    calls = counted(monkeypatch)
    native = decode(model, ids, steps=3)
    assert calls
    monkeypatch.setenv(decode_block.FORCE_ENV, "torch")
    modules = decode(model, ids, steps=3)
    torch.testing.assert_close(native[1], modules[1], rtol=1e-4, atol=1e-4)


def test_calls_the_block_cannot_take_run_the_modules(monkeypatch):
    skip_without_kernels()
    monkeypatch.setenv(decode_block.FORCE_ENV, "native")
    model = random_model(BASE)
    block, step_rows = model.blocks[0], torch.randn(2, 1, BASE.hidden_size)
    with torch.inference_mode():
        assert decode_block.choose(block, step_rows, None) == ("native", None)
        for x in (torch.randn(9, 1, BASE.hidden_size),  # a prompt's rows
                  step_rows.double(),
                  torch.randn(2, 1, 2 * BASE.hidden_size)[..., ::2]):  # strided
            assert not decode_block.fits(block, x, None)
            assert decode_block.choose(block, x, None) == ("torch", None)
        monkeypatch.setenv(decode_block.FORCE_ENV, "torch")
        assert decode_block.choose(block, step_rows, None) == ("torch", None)
    with torch.enable_grad():  # training: autograd needs the modules
        monkeypatch.setenv(decode_block.FORCE_ENV, "native")
        assert not decode_block.fits(block, step_rows, None)


def test_the_path_is_measured_once_the_products_are_decided(monkeypatch):
    """Unforced, a block shape's first calls alternate between the C calls and the modules
    (only once its products' kernels are chosen), and the faster is kept; blocks of one shape
    share the decision."""
    skip_without_kernels()
    from cormlm.models import linear

    monkeypatch.setattr(linear, "_choices", {})
    model = random_model(BASE)
    rows = torch.randn(1, 1, BASE.hidden_size)
    with torch.inference_mode():
        assert decode_block.choose(model.blocks[0], rows, None) == ("torch", None)  # products still measured
        monkeypatch.setenv(linear.FORCE_ENV, "linear")  # (forced: decided)
        paths = []
        for _ in range(2 * (TRIALS + 1)):
            path, key = decode_block.choose(model.blocks[len(paths) % 2], rows, None)
            assert key is not None
            paths.append(path)
            decode_block.record(key, path, 1.0 if path == "native" else 2.0)
        assert sorted(set(paths)) == ["native", "torch"] and paths.count("native") == TRIALS + 1
        assert decode_block.choose(model.blocks[1], rows, None) == ("native", None)
        assert decode_block.kernel_status() == [
            f"hidden 72, heads 6 / 2 of 12, MLP 100, 1 row, {torch.get_num_threads()} threads: C calls"]
        # a slower C call loses: another row count measured the other way round
        two = torch.randn(2, 1, BASE.hidden_size)
        for _ in range(2 * (TRIALS + 1)):
            path, key = decode_block.choose(model.blocks[0], two, None)
            decode_block.record(key, path, 3.0 if path == "native" else 2.0)
        assert decode_block.choose(model.blocks[0], two, None) == ("torch", None)


def test_a_measured_decode_runs_the_chosen_path(monkeypatch):
    """Decoding through the trials themselves (real timings) ends on one path per shape and
    decodes what the modules decode."""
    skip_without_kernels()
    monkeypatch.setenv(LINEAR_ENV, "rows")
    model = random_model(BASE, seed=7)
    ids = torch.randint(0, BASE.vocab_size, (1, 6))
    measured = decode(model, ids, steps=2 * (TRIALS + 1) + 3)
    assert len(decode_block.kernel_status()) == 1
    monkeypatch.setenv(decode_block.FORCE_ENV, "torch")
    modules = decode(model, ids, steps=2 * (TRIALS + 1) + 3)
    assert torch.equal(measured[0], modules[0])
    torch.testing.assert_close(measured[1], modules[1], rtol=1e-4, atol=1e-4)


def test_other_block_shapes_keep_the_modules():
    falcon = dataclasses.replace(BASE, family="falcon", norm="layer", mlp="plain", activation="gelu",
                                 residual="parallel", num_kv_heads=1)
    alibi = dataclasses.replace(BASE, position="alibi")
    relu = dataclasses.replace(BASE, activation="relu")
    for config in (falcon, alibi, relu):
        assert not CausalLM(config).blocks[0].native_shape
    assert CausalLM(BASE).blocks[0].native_shape
    assert not decode_block.shaped_for(BASE, sharded=True)  # tensor parallelism: all-reduces between


def test_a_misspelt_path_is_an_error(monkeypatch):
    skip_without_kernels()
    monkeypatch.setenv(decode_block.FORCE_ENV, "c")
    model = random_model(BASE)
    with pytest.raises(InputError, match="CORMLM_DECODE_BLOCK='c' is not a path; use one of native, torch"):
        decode(model, torch.randint(0, BASE.vocab_size, (1, 4)), steps=1)


def test_a_settled_path_is_asked_again_after_conversion_or_packing(monkeypatch):
    """A block remembers its path; converting or packing its parameters makes it ask again."""
    from cormlm.models import linear

    skip_without_kernels()
    monkeypatch.setenv(decode_block.FORCE_ENV, "native")
    model = random_model(BASE)
    block, rows = model.blocks[0], torch.randn(1, 1, BASE.hidden_size)
    with torch.inference_mode():
        assert decode_block.choose(block, rows, None) == ("native", None)
        assert block.native_memo is not None and decode_block.choose(block, rows, None) == ("native", None)
        model.to(torch.float64)
        model.blocks[1].to(torch.float32)  # (a block converted on its own)
        assert decode_block.choose(block, rows, None) == ("torch", None)  # float32 rows, float64 weights
        assert decode_block.choose(model.blocks[1], rows, None) == ("native", None)
        model.to(torch.float32)
        assert decode_block.choose(block, rows, None) == ("native", None)
        if linear._onednn_available():
            cormlm.pack_weights(model)
            assert decode_block.choose(block, rows, None) == ("torch", None)


def test_each_product_runs_by_the_plan_measured_for_it(monkeypatch):
    """The C calls run each of the block's products by the few-row kernel's plan that the
    product's own trials chose (eagerly: the measured choices; graphs: the calibrated ones),
    the first plan where another kernel won."""
    from cormlm.models import linear

    monkeypatch.delenv(LINEAR_ENV, raising=False)
    block = random_model(BASE).blocks[0]
    qkv, o, gate_up, down = (layer.weight for layer in decode_block._layers(block))
    threads = torch.get_num_threads()
    eager = {(*w.shape, 3, torch.float32, threads, "cpu"): name
             for w, name in ((qkv, "rows_l2"), (o, "rows"), (gate_up, "rows_l2"), (down, "onednn"))}
    monkeypatch.setattr(linear, "_choices", eager)
    graphs = {(*w.shape, 3, torch.float32): name for w, name in ((o, "rows_l2"), (down, "rows_l2"))}
    monkeypatch.setattr(linear, "_graph_choices", graphs)
    assert decode_block._rows_plans(block, 3) == 0b0101
    assert decode_block._rows_plans(block, 3, graph=True) == 0b1010
    assert decode_block._rows_plans(block, 2) == 0  # nothing measured at two rows
    monkeypatch.setenv(LINEAR_ENV, "rows_l2")
    assert decode_block._rows_plans(block, 2) == 0b1111
