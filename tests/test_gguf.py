"""GGUF checkpoints: files the tests write with gguf.GGUFWriter load to the same model as their source."""

from __future__ import annotations

import sys

import gguf
import numpy as np
import pytest
import torch
from checkpoints import save_hf_model
from gguf_files import (
    Q,
    f16,
    f32,
    gguf_tensors,
    naive_q4_k,
    naive_q8_0,
    permute_qk,
    random_q4_k,
    save_reference,
    unpermute_qk,
    write_gguf,
)
from safetensors.torch import load_file

import cormlm
from cormlm.errors import CheckpointError, CheckpointNotFoundError, CormlmError, UnsupportedModelError

FAMILIES = {
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-mha-tied": ("llama", dict(tie_word_embeddings=True)),
    "falcon-7b-mqa": ("falcon", dict(multi_query=True, new_decoder_architecture=False, parallel_attn=True)),
    "falcon-40b-grouped": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "falcon2-one-norm": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1)),
}
IDS = torch.tensor([[3, 17, 99, 4, 150, 42, 8, 61, 7, 120, 33, 5]])


@pytest.fixture(autouse=True)
def _one_linear_kernel(monkeypatch):
    """These tests compare two loads of the same weights to 1e-5 or bit for bit: every product
    through F.linear, not the kernel each product shape is measured with (which differs while
    its trials run, by float32 rounding)."""
    monkeypatch.setenv("CORMLM_LINEAR_KERNEL", "linear")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_f32_gguf_equals_safetensors(tmp_path, case):
    family, overrides = FAMILIES[case]
    folder = save_hf_model(tmp_path / "hf", family, **overrides)
    path = write_gguf(tmp_path / "model.gguf", folder, f32)
    ours, reference = cormlm.load_model(path), cormlm.load_model(folder)
    assert ours.config.replace(stored_dtype=None) == reference.config.replace(stored_dtype=None)
    assert ours.config.stored_dtype == "float32"
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, dtype", [(Q.F16, torch.float16), (Q.BF16, torch.bfloat16)])
def test_half_gguf_equals_rounded_weights(tmp_path, kind, dtype):
    folder = save_hf_model(tmp_path / "hf", "llama", num_key_value_heads=2)

    def encode(_name, array):
        if kind == Q.F16:
            return f16(_name, array)
        return (gguf.quants.quantize(array, kind), kind) if array.ndim == 2 else (array, Q.F32)

    path = write_gguf(tmp_path / "model.gguf", folder, encode)
    rounded = {name: t.to(dtype).float() if t.dim() == 2 or kind == Q.F16 else t
               for name, t in load_file(folder / "model.safetensors").items()}
    reference = cormlm.load_model(save_reference(folder, tmp_path / "ref", rounded))
    ours = cormlm.load_model(path)
    assert ours.config.stored_dtype == str(dtype).removeprefix("torch.")
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)


QUANT_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def _quantized_case(tmp_path, encode_matrix, decode_block):
    """A GGUF whose matrices are stored by ``encode_matrix`` and the HF folder of their naive decoding."""
    folder = save_hf_model(tmp_path / "hf", "llama", **QUANT_SHAPE)
    _, tensors, back = gguf_tensors(folder)
    raw, decoded = {}, {}
    for name, tensor in tensors.items():
        if tensor.dim() == 2:
            data, kind = encode_matrix(tensor.float().numpy())
            raw[name] = (data, kind)
            hf_name, to_hf = back[name]
            decoded[hf_name] = to_hf(torch.from_numpy(decode_block(data)))
    path = write_gguf(tmp_path / "model.gguf", folder, raw=raw)
    return path, save_reference(folder, tmp_path / "ref", decoded)


def test_q8_0_gguf_equals_naively_dequantized_reference(tmp_path):
    path, ref = _quantized_case(tmp_path, lambda a: (gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0), naive_q8_0)
    torch.testing.assert_close(logits(cormlm.load_model(path)), logits(cormlm.load_model(ref)), atol=1e-5, rtol=0)


def test_q4_k_gguf_equals_naively_dequantized_reference(tmp_path):
    gen = np.random.default_rng(0)
    path, ref = _quantized_case(tmp_path, lambda a: (random_q4_k(a.shape[0], a.shape[1], gen), Q.Q4_K), naive_q4_k)
    ours, reference = cormlm.load_model(path), cormlm.load_model(ref)
    assert ours.config.stored_dtype is None  # quantized: float32 on CPU, bfloat16 on GPU by default
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)


def test_naive_block_decoders_agree_with_gguf_py():
    """The two independent statements of the block layouts (ours in the tests, gguf-py's) agree."""
    gen = np.random.default_rng(1)
    blocks = random_q4_k(4, 512, gen)
    np.testing.assert_array_equal(naive_q4_k(blocks), gguf.quants.dequantize(blocks, Q.Q4_K).reshape(4, 512))
    q8 = gguf.quants.quantize(gen.standard_normal((3, 64)).astype(np.float32), Q.Q8_0)
    np.testing.assert_array_equal(naive_q8_0(q8), gguf.quants.dequantize(q8, Q.Q8_0).reshape(3, 64))


def test_qk_permutation_roundtrip():
    weight = torch.arange(8 * 6 * 3, dtype=torch.float32).reshape(48, 3)
    permuted = permute_qk(weight, 4)
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_qk(permuted, 4), weight)


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K])
def test_other_block_types_equal_gguf_py_dequantization(tmp_path, kind):
    """Each remaining type reaches the model exactly as gguf-py decodes it (K types from random blocks)."""
    gen = np.random.default_rng(2)

    def encode(array):
        if kind in (Q.Q5_K, Q.Q6_K):
            block, size = gguf.GGML_QUANT_SIZES[kind]
            data = gen.integers(0, 256, size=(array.shape[0], array.shape[1] // block * size), dtype=np.uint8)
            scale_at = size - 2  # both keep their f16 super-block scale d in the last two bytes
            data.reshape(-1, size)[:, scale_at:] = np.full(data.size // size, 1e-3, np.float16).view(np.uint8).reshape(-1, 2)
            if kind == Q.Q5_K:  # d, dmin lead the block instead
                data.reshape(-1, size)[:, :4] = np.full(2 * (data.size // size), 1e-3, np.float16).view(np.uint8).reshape(-1, 4)
            return data, kind
        return gguf.quants.quantize(array, kind), kind

    path, ref = _quantized_case(tmp_path, encode, lambda data: gguf.quants.dequantize(data, kind))
    ours, reference = logits(cormlm.load_model(path)), logits(cormlm.load_model(ref))
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_folder_holding_one_gguf_and_the_file_both_load(tmp_path):
    folder = save_hf_model(tmp_path / "hf", "llama")
    holder = tmp_path / "holder"
    holder.mkdir()
    path = write_gguf(holder / "tiny.gguf", folder)
    torch.testing.assert_close(logits(cormlm.load_model(holder)), logits(cormlm.load_model(path)), atol=0, rtol=0)
    write_gguf(holder / "other.gguf", folder)
    with pytest.raises(CheckpointNotFoundError, match="several GGUF files .*other.gguf.*tiny.gguf"):
        cormlm.load_model(holder)


# ------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    return write_gguf(tmp / "tiny.gguf", save_hf_model(tmp / "hf", "llama"))


def test_non_gguf_file_is_one_clear_error(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file at all")
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        cormlm.load_model(path)


def test_truncated_gguf_is_one_clear_error(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    for cut in (len(data) // 2, 200):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            cormlm.load_model(path)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    folder = save_hf_model(tmp_path / "hf", "llama")
    path = write_gguf(tmp_path / "model.gguf", folder, architecture="qwen2")
    with pytest.raises(UnsupportedModelError, match="architecture 'qwen2' is not supported; supported: llama, falcon"):
        cormlm.load_model(path)


def test_unsupported_tensor_type_lists_the_supported_ones(tmp_path):
    folder = save_hf_model(tmp_path / "hf", "llama", **QUANT_SHAPE)
    _, tensors, _ = gguf_tensors(folder)
    name = "blk.0.ffn_up.weight"
    rows, cols = tensors[name].shape
    q2k = np.zeros((rows, cols // 256 * gguf.GGML_QUANT_SIZES[Q.Q2_K][1]), dtype=np.uint8)
    path = write_gguf(tmp_path / "model.gguf", folder, raw={name: (q2k, Q.Q2_K)})
    with pytest.raises(UnsupportedModelError, match=r"type Q2_K.*supported types: F32, F16, BF16, Q8_0.*Q6_K"):
        cormlm.load_model(path)


def test_missing_tensor_is_named(tmp_path):
    import gguf_files

    folder = save_hf_model(tmp_path / "hf", "llama")
    original = gguf_files.gguf_tensors

    def without_one(f):
        config, out, back = original(f)
        out.pop("blk.1.ffn_gate.weight")
        return config, out, back

    gguf_files.gguf_tensors = without_one
    try:
        path = write_gguf(tmp_path / "model.gguf", folder)
    finally:
        gguf_files.gguf_tensors = original
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model.layers.1.mlp.gate_proj.weight"):
        cormlm.load_model(path)


def test_without_the_gguf_package_the_error_names_the_extra(monkeypatch, tiny_gguf):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(CormlmError, match=r"pip install 'cormlm\[gguf\]'"):
        cormlm.load_model(tiny_gguf)
