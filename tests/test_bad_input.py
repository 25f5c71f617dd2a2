"""Bad input gets a cormlm error that names the problem, never a traceback from torch."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import rewrite_config, save_hf_model
from safetensors.torch import load_file, save_file

import cormlm


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_hf_model(tmp_path_factory.mktemp("ok"), num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture
def copy(folder, tmp_path):
    """A private copy of the good checkpoint to break."""
    for path in folder.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    return tmp_path


def test_missing_folder(tmp_path):
    with pytest.raises(cormlm.CheckpointNotFoundError, match="no such folder"):
        cormlm.load_model(str(tmp_path / "nope" / "model"))


def test_missing_config(copy):
    (copy / "config.json").unlink()
    with pytest.raises(cormlm.CheckpointNotFoundError, match="no config.json"):
        cormlm.load_model(copy)


def test_corrupt_config(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(cormlm.CheckpointError, match="config.json is not valid JSON"):
        cormlm.load_model(copy)


def test_unknown_model_type_lists_supported(copy):
    rewrite_config(copy, lambda c: {**c, "model_type": "gpt_neox"})
    with pytest.raises(cormlm.UnsupportedModelError, match="gpt_neox.*supported model types: .*RefinedWeb.*falcon.*llama.*mistral"):
        cormlm.load_model(copy)


def test_unsupported_rope_type(copy):
    rewrite_config(copy, lambda c: {**c, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})
    with pytest.raises(cormlm.ConfigError, match="longrope.*supported types: default, linear, dynamic, llama3, yarn"):
        cormlm.load_model(copy)


def test_heads_not_divisible(copy):
    rewrite_config(copy, lambda c: {**c, "num_key_value_heads": 3})
    with pytest.raises(cormlm.ConfigError, match=r"num_attention_heads \(4\) must be a multiple of the number of KV heads \(3\)"):
        cormlm.load_model(copy)


def test_missing_weights_file(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(cormlm.CheckpointNotFoundError, match="has no model.safetensors"):
        cormlm.load_model(copy)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(copy, damage):
    path = copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(cormlm.CheckpointError, match="model.safetensors"):
        cormlm.load_model(copy)


def test_missing_tensor_named_with_shape(copy):
    tensors = load_file(copy / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(cormlm.CheckpointError, match=r"model.layers.1.self_attn.k_proj.weight \(expected shape \[32, 64\]\)"):
        cormlm.load_model(copy)


def test_shape_mismatch_named(copy):
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(cormlm.CheckpointError,
                       match=r"model.layers.0.mlp.up_proj.weight: checkpoint has shape \[100, 64\], the config implies \[112, 64\]"):
        cormlm.load_model(copy)


def test_unexpected_tensor_named(copy):
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(cormlm.CheckpointError, match="unexpected tensor.*model.layers.0.self_attn.extra.weight"):
        cormlm.load_model(copy)


def test_missing_shard(tmp_path):
    folder = save_hf_model(tmp_path, max_shard_size="60KB")
    shards = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
    (folder / shards[-1]).unlink()
    with pytest.raises(cormlm.CheckpointNotFoundError, match=f"lists shard {shards[-1]}, which is missing"):
        cormlm.load_model(folder)


def test_token_id_outside_vocab(folder):
    model = cormlm.load_model(folder)
    ids = torch.tensor([[1, 2, 160, 3]])
    with pytest.raises(cormlm.InputError, match=r"token id 160 at \[batch 0, position 2\] is outside the vocabulary"):
        model(ids)
    with pytest.raises(cormlm.InputError, match="outside the vocabulary"):
        cormlm.generate(model, torch.tensor([[-1, 2]]), max_new_tokens=2)


def test_prompt_longer_than_context(folder):
    model = cormlm.load_model(folder)
    with pytest.raises(cormlm.InputError, match="65 tokens long but the model accepts at most 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(cormlm.InputError, match=r"prompt \(60 tokens\) \+ max_new_tokens \(10\) exceeds .* 64"):
        cormlm.generate(model, torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)
    cache = cormlm.make_cache(model, batch_size=1)
    model(torch.zeros(1, 60, dtype=torch.long), cache=cache)
    with pytest.raises(cormlm.InputError, match="65 tokens long"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_bad_shapes_and_arguments(folder):
    model = cormlm.load_model(folder)
    with pytest.raises(cormlm.InputError, match="2-D tensor"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(cormlm.InputError, match="integer token ids"):
        model(torch.zeros(1, 5))
    with pytest.raises(cormlm.InputError, match="attention_mask has shape"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4))
    with pytest.raises(cormlm.InputError, match="batch size 2"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cormlm.make_cache(model, batch_size=2))
    for kwargs, match in [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
                          ({"top_p": 1.5}, "top_p"), ({"max_new_tokens": -2}, "max_new_tokens")]:
        with pytest.raises(cormlm.InputError, match=match):
            cormlm.generate(model, torch.zeros(1, 3, dtype=torch.long), **kwargs)


def test_bad_dtype_and_device(folder):
    with pytest.raises(cormlm.ConfigError, match="unknown dtype 'float8'"):
        cormlm.load_model(folder, dtype="float8")
    with pytest.raises(cormlm.ConfigError, match="unknown device"):
        cormlm.load_model(folder, device="tpu9")


def test_bad_cache_config():
    with pytest.raises(cormlm.CacheConfigError, match="unknown cache policy 'lru'; available policies: full"):
        cormlm.CacheConfig(policy="lru")
    with pytest.raises(cormlm.CacheConfigError, match="window must be >= 1"):
        cormlm.CacheConfig("corm", window=0)
    with pytest.raises(cormlm.CacheConfigError, match="recent must be an integer"):
        cormlm.CacheConfig("corm", recent=1.5)


def test_hub_offline_error_says_pass_a_folder(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    with pytest.raises(cormlm.HubError, match="pass a local folder"):
        cormlm.load_model("some-org/not-cached-model", cache_dir=tmp_path)


@pytest.fixture(scope="module")
def falcon(tmp_path_factory):
    return save_hf_model(tmp_path_factory.mktemp("falcon"), model_type="falcon", new_decoder_architecture=True,
                         num_kv_heads=2)


@pytest.fixture
def falcon_copy(falcon, tmp_path):
    for path in falcon.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    return tmp_path


def test_falcon_heads_not_divisible_by_kv_heads(falcon_copy):
    rewrite_config(falcon_copy, lambda c: {**c, "num_kv_heads": 3})
    with pytest.raises(cormlm.ConfigError, match=r"num_attention_heads \(4\) must be a multiple of the number of KV heads \(3\)"):
        cormlm.load_model(falcon_copy)


def test_falcon_fused_qkv_of_wrong_size_is_named(falcon_copy):
    tensors = load_file(falcon_copy / "model.safetensors")
    name = "transformer.h.1.self_attention.query_key_value.weight"
    assert tensors[name].shape == (128, 64)  # (4 query + 2 x 2 KV heads) x 16
    tensors[name] = tensors[name][:112]
    save_file(tensors, falcon_copy / "model.safetensors")
    with pytest.raises(cormlm.CheckpointError, match=rf"{name}: checkpoint has shape \[112, 64\], the config implies \[128, 64\]"):
        cormlm.load_model(falcon_copy)


@pytest.mark.parametrize("edit, what", [
    ({"num_ln_in_parallel_attn": 3}, "num_ln_in_parallel_attn=3"),
    ({"parallel_attn": False, "num_ln_in_parallel_attn": 1}, "new_decoder_architecture with parallel_attn=false"),
    ({"alibi": True}, "new_decoder_architecture with alibi"),
    ({"new_decoder_architecture": False, "multi_query": False, "num_kv_heads": 2}, "num_kv_heads=2 without"),
])
def test_unknown_falcon_variant_lists_supported_layouts(falcon_copy, edit, what):
    rewrite_config(falcon_copy, lambda c: {**c, **edit})
    with pytest.raises(cormlm.UnsupportedModelError, match=f"unknown Falcon variant \\({what}.*supported layouts: Falcon-7B"):
        cormlm.load_model(falcon_copy)
