"""cormlm.pack_weights: oneDNN-packed weights compute what the plain ones do, hold no second
copy, leave a tied LM head alone, and refuse what they cannot do (compile, save, other
dtypes) with one clear error."""

from __future__ import annotations

import pytest
import torch
from checkpoints import save_hf_model

import cormlm
from cormlm.models.linear import Linear, _onednn_available

pytestmark = pytest.mark.skipif(not _onednn_available(), reason="this torch build has no oneDNN")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_hf_model(tmp_path_factory.mktemp("pack"), num_key_value_heads=2)


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory):
    return save_hf_model(tmp_path_factory.mktemp("tied"), num_key_value_heads=2, tie_word_embeddings=True)


@torch.inference_mode()
@pytest.mark.parametrize("policy", ["full", "corm"])
def test_packed_model_decodes_what_the_plain_one_does(folder, policy):
    """Padded prompts of three rows, then decode steps (one row per product and three): the same
    logits within float32 rounding, the same greedy tokens."""
    plain = cormlm.load_model(folder)
    packed = cormlm.pack_weights(cormlm.load_model(folder), rows=3)
    torch.manual_seed(0)
    ids = torch.randint(0, plain.config.vocab_size, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    cfg = cormlm.CacheConfig(policy, **({"window": 4, "recent": 4} if policy == "corm" else {}))
    runs = [cormlm.generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], cache=cfg)
            for model in (plain, packed)]
    assert runs[0].new_tokens == runs[1].new_tokens
    one = torch.tensor([[5, 9, 14]])
    torch.testing.assert_close(packed(one), plain(one), rtol=1e-4, atol=1e-4)


def test_packing_replaces_the_plain_weights_and_keeps_a_tied_head(tied_folder):
    model = cormlm.load_model(tied_folder)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    cpu_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
    cormlm.pack_weights(model)
    assert model.lm_head.weight is model.embed.weight and model.lm_head.packed is None  # the embedding reads it
    packed = [m for m in layers if m is not model.lm_head]
    assert packed and all(m.packed is not None and m.weight.device.type == "meta" for m in packed)
    left = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
    assert left == cpu_bytes - sum(m.weight.numel() * m.weight.element_size() for m in packed)
    assert cormlm.pack_weights(model) is model  # packing again changes nothing


def test_packed_models_refuse_compile_and_save_and_packing_refuses_what_it_cannot_pack(folder, tmp_path):
    model = cormlm.pack_weights(cormlm.load_model(folder))
    with pytest.raises(cormlm.CormlmError, match="packed weights"):
        cormlm.compile_model(model)
    from cormlm.checkpoint.save import save_pretrained

    target = tmp_path / "out"
    with pytest.raises(cormlm.CormlmError, match="save the model before packing"):
        save_pretrained(model, target)
    assert not target.exists()  # nothing written
    with pytest.raises(cormlm.CormlmError, match="float32 or bfloat16"):
        cormlm.pack_weights(cormlm.load_model(folder, dtype="float64"))
    for rows in (0, 2.5, True):
        with pytest.raises(cormlm.CormlmError, match="rows must be"):
            cormlm.pack_weights(cormlm.load_model(folder), rows=rows)
    compiled = cormlm.load_model(folder)
    compiled.compiled = True  # as compile_model leaves it (without paying for compiling)
    with pytest.raises(cormlm.CormlmError, match="eager only"):
        cormlm.pack_weights(compiled)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_a_packed_layer_computes_f_linear_at_any_row_count(dtype, rows):
    torch.manual_seed(rows)
    layer = Linear(64, 96).to(dtype)
    x = torch.randn(2, rows, 64, dtype=dtype)
    want = torch.nn.functional.linear(x, layer.weight, layer.bias)
    layer.pack(8)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layer(x), want, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(layer(x, bias=False), want - layer.bias, rtol=tolerance, atol=tolerance)
