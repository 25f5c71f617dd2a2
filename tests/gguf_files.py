"""GGUF files written by the tests: a Hugging Face checkpoint re-encoded as llama.cpp's converter does.

Written from llama.cpp's conventions, independently of cormlm's reader: tensor names
(``blk.N.attn_q.weight``...), Llama's q/k rows permuted so each head's rotary halves are
interleaved as pairs, Falcon's fused qkv regrouped as [all q | all k | all v], GGUF's
reversed dimension order. Each tensor is stored in the type ``types`` picks for it.
Quantized blocks are decoded by the naive per-block references below, written from
ggml's block layouts, so the expected weights do not come from the code under test.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file

Q = gguf.GGMLQuantizationType


def permute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert: rows (head, half, i) -> (head, i, half)."""
    rest = weight.shape[1:]
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def unpermute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rest = weight.shape[1:]
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def falcon_to_gguf_qkv(weight: torch.Tensor, heads: int, kv: int, new_arch: bool) -> torch.Tensor:
    """HF's grouped (new decoder architecture) or multi-query qkv -> [all q | all k | all v]."""
    if not new_arch:
        return weight  # multi-query: already [q heads | k | v]
    d = weight.shape[0] // (heads + 2 * kv)
    rest = weight.shape[1:]
    grouped = weight.reshape(kv, heads // kv + 2, d, *rest)
    q = grouped[:, :-2].reshape(heads * d, *rest)
    k = grouped[:, -2].reshape(kv * d, *rest)
    v = grouped[:, -1].reshape(kv * d, *rest)
    return torch.cat([q, k, v])


# --------------------------------------------------------- naive block decoders


def _f16(raw: np.ndarray) -> np.ndarray:
    """[n, 2] bytes -> [n] float32."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32).reshape(-1)


def naive_q8_0(data: np.ndarray) -> np.ndarray:
    """Blocks of 34 bytes: f16 scale d, 32 int8 q; x = d * q."""
    rows = data.reshape(-1, 34)
    d = _f16(rows[:, :2])
    q = rows[:, 2:].view(np.int8).astype(np.float32)
    return (d[:, None] * q).reshape(data.shape[0], -1)


def _q4k_scale_min(scales: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4: eight 6-bit (scale, min) pairs packed into 12 bytes."""
    s = scales.astype(np.int32)
    if j < 4:
        return s[:, j] & 63, s[:, j + 4] & 63
    sc = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
    mn = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return sc, mn


def naive_q4_k(data: np.ndarray) -> np.ndarray:
    """Super-blocks of 144 bytes for 256 weights: f16 d, f16 dmin, 12 bytes of 6-bit scales and
    mins for 8 sub-blocks of 32, 128 bytes of 4-bit quants (low nibbles first within each 64)."""
    blocks = data.reshape(-1, 144)
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    scales, qs = blocks[:, 4:16], blocks[:, 16:144].astype(np.int32)
    out = np.empty((blocks.shape[0], 256), dtype=np.float32)
    for chunk in range(4):  # each 64 weights use 32 bytes: low nibbles, then high nibbles
        q = qs[:, 32 * chunk: 32 * chunk + 32]
        for half, nibbles in enumerate((q & 0xF, q >> 4)):
            sc, mn = _q4k_scale_min(scales, 2 * chunk + half)
            start = 64 * chunk + 32 * half
            out[:, start:start + 32] = (d * sc)[:, None] * nibbles - (dmin * mn)[:, None]
    return out.reshape(data.shape[0], -1)


def random_q4_k(rows: int, cols: int, gen: np.random.Generator) -> np.ndarray:
    """Valid Q4_K bytes with random quants and scales (gguf-py cannot quantize K types)."""
    blocks = gen.integers(0, 256, size=(rows * cols // 256, 144), dtype=np.uint8)
    blocks[:, 0:2] = np.full(len(blocks), 0.002, np.float16).view(np.uint8).reshape(-1, 2)
    blocks[:, 2:4] = np.full(len(blocks), 0.001, np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


# ------------------------------------------------------------------ writers

Encoder = Callable[[str, np.ndarray], tuple[np.ndarray, Q]]


def f32(_name: str, array: np.ndarray):
    return array.astype(np.float32), Q.F32


def f16(_name: str, array: np.ndarray):
    return array.astype(np.float16), Q.F16


def quantized(kind: Q) -> Encoder:
    """Matrices in ``kind`` (via gguf-py's quantizer), vectors in F32."""
    def encode(_name: str, array: np.ndarray):
        if array.ndim < 2:
            return array.astype(np.float32), Q.F32
        return gguf.quants.quantize(array.astype(np.float32), kind), kind
    return encode


def _llama_names(i: str, leaf: str) -> str | None:
    table = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    module, _, kind = leaf.rpartition(".")
    return f"blk.{i}.{table[module]}.{kind}" if module in table else None


def _falcon_names(i: str, leaf: str) -> str | None:
    table = {"input_layernorm": "attn_norm", "ln_attn": "attn_norm", "ln_mlp": "attn_norm_2",
             "self_attention.query_key_value": "attn_qkv", "self_attention.dense": "attn_output",
             "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}
    module, _, kind = leaf.rpartition(".")
    return f"blk.{i}.{table[module]}.{kind}" if module in table else None


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


LLAMA_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
FALCON_TOP = {"transformer.word_embeddings.weight": "token_embd.weight", "transformer.ln_f.weight": "output_norm.weight",
              "transformer.ln_f.bias": "output_norm.bias", "lm_head.weight": "output.weight"}


def _llama_tensor(config: dict, gname: str, tensor: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    """A Llama block tensor in GGUF's row order, and the way back."""
    if ".attn_q." not in gname and ".attn_k." not in gname:
        return tensor, _identity
    heads = config["num_attention_heads"]
    n = heads if ".attn_q." in gname else (config.get("num_key_value_heads") or heads)
    return permute_qk(tensor, n), (lambda t: unpermute_qk(t, n))


def _falcon_tensor(config: dict, gname: str, tensor: torch.Tensor) -> tuple[torch.Tensor, Callable | None]:
    """A Falcon block tensor in GGUF's layout (no quantized Falcon references: no way back)."""
    if ".attn_qkv." in gname:
        new_arch = config.get("new_decoder_architecture", False)
        kv = config.get("num_kv_heads") if new_arch else 1
        tensor = falcon_to_gguf_qkv(tensor, config["num_attention_heads"], kv, new_arch)
    return tensor, None


def gguf_tensors(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, tuple[str, Callable]]]:
    """(config.json, tensors under GGUF names in GGUF's row layout, GGUF name -> (HF name, back to
    HF layout)) of an HF checkpoint folder."""
    config = json.loads((folder / "config.json").read_text())
    llama = config["model_type"] == "llama"
    top, names, convert = (LLAMA_TOP, _llama_names, _llama_tensor) if llama else \
        (FALCON_TOP, _falcon_names, _falcon_tensor)
    out: dict[str, torch.Tensor] = {}
    back: dict[str, tuple[str, Callable]] = {}
    for name, tensor in load_file(folder / "model.safetensors").items():
        if name in top:
            out[top[name]], back[top[name]] = tensor, (name, _identity)
            continue
        _, _, i, leaf = name.split(".", 3)
        gname = names(i, leaf)
        out[gname], inverse = convert(config, gname, tensor)
        back[gname] = (name, inverse)
    if config.get("tie_word_embeddings", not llama):
        out.pop("output.weight", None)
    return config, out, back


def write_gguf(path: Path, folder: Path, encode: Encoder = f32, *, raw: dict[str, tuple[np.ndarray, Q]] | None = None,
               tokenizer: Callable[[gguf.GGUFWriter], None] | None = None, architecture: str | None = None) -> Path:
    """Write the HF checkpoint in ``folder`` as a GGUF file; ``raw`` overrides tensors with stored bytes."""
    config, tensors, _ = gguf_tensors(folder)
    arch = architecture or config["model_type"]
    writer = gguf.GGUFWriter(str(path), arch)
    heads = config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_head_count(heads)
    writer.add_vocab_size(config["vocab_size"])
    if config["model_type"] == "llama":
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
        writer.add_rope_freq_base(float(config.get("rope_parameters", {}).get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        writer.add_rope_dimension_count(config["hidden_size"] // heads)
    else:
        new_arch = config.get("new_decoder_architecture", False)
        writer.add_feed_forward_length(config.get("ffn_hidden_size") or 4 * config["hidden_size"])
        writer.add_head_count_kv(config["num_kv_heads"] if new_arch else 1)
        writer.add_layer_norm_eps(config["layer_norm_epsilon"])
        writer.add_rope_freq_base(float(config.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    if tokenizer is not None:
        tokenizer(writer)
    for name, tensor in tensors.items():
        if raw and name in raw:
            data, kind = raw[name]
        else:
            data, kind = encode(name, tensor.float().numpy())
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def save_reference(folder: Path, target: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A copy of the HF checkpoint ``folder`` whose tensors are replaced by ``weights`` (HF names)."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text((folder / "config.json").read_text())
    base = load_file(folder / "model.safetensors")
    base.update(weights)
    save_file({k: v.contiguous() for k, v in base.items()}, target / "model.safetensors")
    return target
