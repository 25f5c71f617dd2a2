"""Loading: dtypes, tied weights, stop ids, no random initialisation, hub ids."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from checkpoints import load_hf_model, save_hf_model

import cormlm


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = save_hf_model(tmp_path_factory.mktemp("load"), num_key_value_heads=2, tie_word_embeddings=True,
                           dtype=torch.bfloat16)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]}))
    return folder


def test_weights_never_initialised_randomly(folder, monkeypatch):
    """The model is built on the meta device: no init function touches real memory."""
    calls = []
    for name in ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_"):
        original = getattr(torch.nn.init, name)

        def spy(tensor, *args, _original=original, _name=name, **kwargs):
            if not tensor.is_meta:
                calls.append(_name)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, spy)
    cormlm.load_model(folder)
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stored_bf16_converted_to_requested_dtype(folder, dtype):
    model = cormlm.load_model(folder, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert all(p.device.type == "cpu" for p in model.parameters())
    if dtype == torch.bfloat16:  # bf16 -> bf16 is exact, and logits follow transformers in bf16
        ids = torch.randint(0, 160, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ours = model(ids).float()
            theirs = load_hf_model(folder, dtype=torch.bfloat16)(ids).logits.float()
        assert (ours - theirs).abs().max() < 0.05


def test_tied_embeddings_share_storage(folder):
    model = cormlm.load_model(folder)
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()


def test_stop_and_start_ids_from_generation_config(folder):
    config = cormlm.load_model(folder).config
    assert config.eos_token_ids == (2, 7)
    assert config.bos_token_id == 1


def test_default_dtype_is_float32_on_cpu(folder):
    assert cormlm.load_model(folder, dtype="auto").dtype == torch.float32
    assert cormlm.load_model(folder, dtype="bf16").dtype == torch.bfloat16


def test_hub_id_resolves_from_local_cache_offline(folder, tmp_path, monkeypatch):
    """A hub id already in the cache loads with HF_HUB_OFFLINE=1 and no network."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--some-org--tiny-llama"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = cormlm.load_model("some-org/tiny-llama", cache_dir=tmp_path)
    assert model.config.num_kv_heads == 2


def test_path_like_missing_folder_is_not_sent_to_hub(tmp_path):
    with pytest.raises(cormlm.CheckpointNotFoundError, match="no such folder"):
        cormlm.load_model("./does/not/exist")
    file = tmp_path / "config.json"
    file.write_text("{}")
    with pytest.raises(cormlm.CheckpointNotFoundError, match="is a file"):
        cormlm.load_model(file)
