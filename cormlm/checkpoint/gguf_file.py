"""GGUF files (llama.cpp's format) as checkpoints: config from the metadata, tensors dequantized one at a time.

A GGUF file is turned into what a Hugging Face folder would give: a config dict for
:func:`cormlm.checkpoint.hf_config.from_hf_config` and a :class:`~cormlm.checkpoint.tensors.TensorSource` that
answers in Hugging Face tensor names and layout. So the loader, its name/shape checks and
the model code are the same for both formats. What llama.cpp's converter changed is undone
here: the q/k row permutation of Llama (interleaved RoPE pairs) and Falcon's regrouped
query_key_value. Dequantization is the ``gguf`` library's (numpy), one tensor at a time,
so the peak is the model in the requested dtype plus one float32 tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, CormlmError, UnsupportedModelError
from .hf_config import from_hf_config

SUPPORTED_ARCHITECTURES = ("llama", "falcon")
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
GGUF_MAGIC = b"GGUF"

# Llama 3.1+ GGUF files carry RoPE scaling as a tensor of per-frequency divisors
# (rope_freqs) instead of metadata; these are the published settings it is matched against.
LLAMA3_ROPE_CANDIDATES = (
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def open_gguf(path: Path):
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped), or one clear error."""
    try:
        import gguf
    except ImportError:
        raise CormlmError(
            f"{path} is a GGUF file; reading it needs the 'gguf' package: pip install 'cormlm[gguf]'"
        ) from None
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with b'GGUF'); "
                              "pass a .gguf file written by llama.cpp or gguf-py")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError... on bad files
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                              "it may be truncated or corrupt: re-download it") from None


def field(reader, key: str, default: Any = None) -> Any:
    """A metadata value as plain Python (str, int, float, bool or list), or ``default``.

    Floats are stored as float32; they come back as the shortest decimal that rounds to
    that float32 (1e-05, not 9.999999747378752e-06), i.e. the value the converter was given.
    """
    entry = reader.fields.get(key)
    if entry is None:
        return default
    value = entry.contents()
    if isinstance(value, float) and entry.types and entry.types[0].name == "FLOAT32":
        import numpy

        value = float(str(numpy.float32(value)))
    return value


def _tensor_type_name(tensor) -> str:
    return tensor.tensor_type.name


# ------------------------------------------------------------------- config


def _required(reader, key: str, path: Path) -> Any:
    value = field(reader, key)
    if value is None:
        raise CheckpointError(f"{path}: GGUF metadata has no '{key}'; the file is incomplete")
    return value


def _integer(value: Any, key: str, path: Path) -> int:
    if isinstance(value, list):
        raise UnsupportedModelError(f"{path}: '{key}' differs per layer ({value[:4]}...); cormlm needs one value "
                                    "for every layer")
    return int(value)


def _rope_scaling(reader, arch: str, path: Path, tensors: dict[str, Any]) -> dict[str, Any] | None:
    kind = field(reader, f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in tensors:
        return _llama3_rope(tensors["rope_freqs.weight"], reader, arch, path)
    if kind in (None, "none"):
        return None
    factor = field(reader, f"{arch}.rope.scaling.factor")
    original = field(reader, f"{arch}.rope.scaling.original_context_length")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise UnsupportedModelError(f"{path}: RoPE scaling type '{kind}' is not supported; supported: none, linear, "
                                "yarn, and Llama 3's rope_freqs")


def _llama3_rope(tensor, reader, arch: str, path: Path) -> dict[str, Any]:
    """Which published Llama 3 scaling produced this rope_freqs tensor (divisors per frequency)."""
    from ..config import RopeConfig
    from ..models.rope import base_inv_freq, llama3_inv_freq

    stored = torch.from_numpy(_dequantize(tensor).reshape(-1).copy()).double()
    theta = float(field(reader, f"{arch}.rope.freq_base", 10000.0))
    plain = base_inv_freq(theta, 2 * stored.numel())
    for candidate in LLAMA3_ROPE_CANDIDATES:
        scaled = llama3_inv_freq(RopeConfig(theta=theta, type="llama3", **candidate), plain)
        if torch.allclose((plain / scaled).double(), stored, rtol=1e-3, atol=1e-3):
            return {"rope_type": "llama3", **candidate}
    raise UnsupportedModelError(f"{path}: its rope_freqs tensor matches none of Llama 3's published RoPE scalings "
                                f"({', '.join(str(c['factor']) for c in LLAMA3_ROPE_CANDIDATES)}x); "
                                "convert the model with a config.json instead")


def _file_dtype(tensors: dict[str, Any]) -> str | None:
    """The checkpoint dtype when every matrix is stored unquantized."""
    names = {_tensor_type_name(t) for name, t in tensors.items() if len(t.shape) > 1}
    return {frozenset({"F32"}): "float32", frozenset({"F16"}): "float16",
            frozenset({"BF16"}): "bfloat16"}.get(frozenset(names))


def hf_config_dict(reader, path: Path, tensors: dict[str, Any]) -> dict[str, Any]:
    """The config.json a Hugging Face export of this GGUF model would carry."""
    arch = field(reader, "general.architecture")
    if arch is None:
        raise CheckpointError(f"{path}: GGUF metadata has no 'general.architecture'; the file is incomplete")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: GGUF architecture '{arch}' is not supported; supported: "
                                    f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3, SmolLM, Mistral as llama; Falcon)")
    heads = _integer(_required(reader, f"{arch}.attention.head_count", path), "attention.head_count", path)
    kv_heads = _integer(field(reader, f"{arch}.attention.head_count_kv", heads), "attention.head_count_kv", path)
    hidden = int(_required(reader, f"{arch}.embedding_length", path))
    embed = tensors.get("token_embd.weight")
    vocab = field(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else (int(embed.shape[-1]) if embed is not None else None)
    if vocab is None:
        raise CheckpointError(f"{path}: neither metadata nor tensors give the vocabulary size")
    common = {
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "num_hidden_layers": int(_required(reader, f"{arch}.block_count", path)),
        "num_attention_heads": heads,
        "max_position_embeddings": int(field(reader, f"{arch}.context_length", 2048)),
        "rope_theta": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": _file_dtype(tensors),
    }
    scaling = _rope_scaling(reader, arch, path, tensors)
    if scaling is not None:
        common["rope_scaling"] = scaling
    if arch == "llama":
        head_dim = field(reader, f"{arch}.attention.key_length") or hidden // heads
        rotary = field(reader, f"{arch}.rope.dimension_count", head_dim)
        return {"model_type": "llama", **common, "num_key_value_heads": kv_heads, "head_dim": int(head_dim),
                "intermediate_size": int(_required(reader, f"{arch}.feed_forward_length", path)),
                "rms_norm_eps": float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
                "partial_rotary_factor": int(rotary) / int(head_dim),
                "attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": "blk.0.ffn_up.bias" in tensors}
    two_norms = "blk.0.attn_norm_2.weight" in tensors
    return {"model_type": "falcon", **common, "num_kv_heads": kv_heads,
            "ffn_hidden_size": int(field(reader, f"{arch}.feed_forward_length", 4 * hidden)),
            "layer_norm_epsilon": float(field(reader, f"{arch}.attention.layer_norm_epsilon", 1e-5)),
            "new_decoder_architecture": two_norms or kv_heads > 1, "multi_query": kv_heads == 1,
            "num_ln_in_parallel_attn": 2 if two_norms else 1, "parallel_attn": True, "alibi": False,
            "bias": "blk.0.attn_qkv.bias" in tensors}


# ------------------------------------------------------------------ tensors

Transform = Callable[[torch.Tensor], torch.Tensor]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _unpermute(heads: int) -> Transform:
    """Undo llama.cpp's q/k row order (each head's rotary halves interleaved as pairs)."""

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        rest = tensor.shape[1:]
        return tensor.reshape(heads, -1, 2, *rest).transpose(1, 2).reshape(tensor.shape)

    return transform


def _falcon_regroup(config: ModelConfig) -> Transform:
    """llama.cpp stores Falcon's fused qkv as [all q | all k | all v]; HF's grouped layout
    interleaves per KV group (its query heads, one key, one value)."""
    heads, kv, d = config.num_heads, config.num_kv_heads, config.head_dim

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        if config.qkv_layout != "falcon_grouped":
            return tensor  # multi-query: [q heads | k | v] is already HF's layout
        rest = tensor.shape[1:]
        q, k, v = tensor.split([heads * d, kv * d, kv * d])
        grouped = torch.cat([q.reshape(kv, heads // kv, d, *rest), k.reshape(kv, 1, d, *rest),
                             v.reshape(kv, 1, d, *rest)], dim=1)
        return grouped.reshape(tensor.shape)

    return transform


@dataclass(frozen=True)
class NameRule:
    """One GGUF tensor name pattern, its Hugging Face name, and the layout change between them."""

    gguf: str  # regex over the GGUF name; groups feed ``hf``
    hf: str
    transform: Callable[[ModelConfig], Transform] = lambda config: _identity


LLAMA_RULES = (
    NameRule(r"token_embd\.weight", "model.embed_tokens.weight"),
    NameRule(r"output_norm\.weight", "model.norm.weight"),
    NameRule(r"output\.weight", "lm_head.weight"),
    NameRule(r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    NameRule(r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    NameRule(r"blk\.(\d+)\.attn_q\.(weight|bias)", "model.layers.{0}.self_attn.q_proj.{1}",
             lambda config: _unpermute(config.num_heads)),
    NameRule(r"blk\.(\d+)\.attn_k\.(weight|bias)", "model.layers.{0}.self_attn.k_proj.{1}",
             lambda config: _unpermute(config.num_kv_heads)),
    NameRule(r"blk\.(\d+)\.attn_v\.(weight|bias)", "model.layers.{0}.self_attn.v_proj.{1}"),
    NameRule(r"blk\.(\d+)\.attn_output\.(weight|bias)", "model.layers.{0}.self_attn.o_proj.{1}"),
    NameRule(r"blk\.(\d+)\.ffn_gate\.(weight|bias)", "model.layers.{0}.mlp.gate_proj.{1}"),
    NameRule(r"blk\.(\d+)\.ffn_up\.(weight|bias)", "model.layers.{0}.mlp.up_proj.{1}"),
    NameRule(r"blk\.(\d+)\.ffn_down\.(weight|bias)", "model.layers.{0}.mlp.down_proj.{1}"),
)

FALCON_RULES = (
    NameRule(r"token_embd\.weight", "transformer.word_embeddings.weight"),
    NameRule(r"output_norm\.(weight|bias)", "transformer.ln_f.{0}"),
    NameRule(r"output\.weight", "lm_head.weight"),
    NameRule(r"blk\.(\d+)\.attn_qkv\.(weight|bias)", "transformer.h.{0}.self_attention.query_key_value.{1}",
             _falcon_regroup),
    NameRule(r"blk\.(\d+)\.attn_output\.(weight|bias)", "transformer.h.{0}.self_attention.dense.{1}"),
    NameRule(r"blk\.(\d+)\.ffn_up\.(weight|bias)", "transformer.h.{0}.mlp.dense_h_to_4h.{1}"),
    NameRule(r"blk\.(\d+)\.ffn_down\.(weight|bias)", "transformer.h.{0}.mlp.dense_4h_to_h.{1}"),
)


def _falcon_norm_rules(config: ModelConfig) -> tuple[NameRule, ...]:
    if config.parallel_norms == 2:
        return (NameRule(r"blk\.(\d+)\.attn_norm\.(weight|bias)", "transformer.h.{0}.ln_attn.{1}"),
                NameRule(r"blk\.(\d+)\.attn_norm_2\.(weight|bias)", "transformer.h.{0}.ln_mlp.{1}"))
    return (NameRule(r"blk\.(\d+)\.attn_norm\.(weight|bias)", "transformer.h.{0}.input_layernorm.{1}"),)


# Tensors llama.cpp writes that hold nothing cormlm loads (consumed into the config).
CONSUMED = ("rope_freqs.weight",)


def _dequantize(tensor) -> Any:
    """The tensor as a float32 numpy array in row-major [rows, columns] order."""
    from gguf import quants

    kind = _tensor_type_name(tensor)
    if kind not in SUPPORTED_TENSOR_TYPES:
        raise UnsupportedModelError(f"tensor '{tensor.name}' has type {kind}, which cormlm does not dequantize; "
                                    f"supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}")
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)


class GGUFSource:
    """A GGUF file's tensors under Hugging Face names, dequantized on read."""

    def __init__(self, path: Path, reader, config: ModelConfig) -> None:
        self.where = path
        self.file_type = None if config.stored_dtype else file_type(reader)
        rules = LLAMA_RULES if config.family == "llama" else FALCON_RULES + _falcon_norm_rules(config)
        compiled = [(re.compile(rule.gguf), rule) for rule in rules]
        self.entries: dict[str, tuple[Any, Transform]] = {}
        for tensor in reader.tensors:
            if tensor.name in CONSUMED:
                continue
            for pattern, rule in compiled:
                match = pattern.fullmatch(tensor.name)
                if match:
                    self.entries[rule.hf.format(*match.groups())] = (tensor, rule.transform(config))
                    break
            else:
                self.entries[tensor.name] = (tensor, _identity)  # reported as unexpected by the loader

    def names(self) -> Iterable[str]:
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.entries[name][0].shape))

    def read(self, name: str) -> torch.Tensor:
        tensor, transform = self.entries[name]
        try:
            values = _dequantize(tensor)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.where}: tensor '{tensor.name}' cannot be read ({exc}); "
                                  "the file may be truncated: re-download it") from None
        if not values.flags.writeable:  # an unquantized tensor is a view of the read-only memory map
            values = values.copy()
        return transform(torch.from_numpy(values))

    def close(self) -> None:
        pass  # the reader's memory map closes with the reader


def gguf_checkpoint(path: Path) -> tuple[ModelConfig, GGUFSource, Any]:
    """(config, tensor source, reader) for a GGUF file; every tensor type is checked up front."""
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    unsupported = sorted({_tensor_type_name(t) for t in tensors.values()} - set(SUPPORTED_TENSOR_TYPES))
    if unsupported:
        raise UnsupportedModelError(f"{path} holds tensors of type {', '.join(unsupported)}, which cormlm does not "
                                    f"dequantize; supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}")
    config = from_hf_config(hf_config_dict(reader, path, tensors), str(path))
    return config, GGUFSource(path, reader, config), reader


def parameter_count(reader) -> int:
    return sum(math.prod(int(n) for n in t.shape) for t in reader.tensors if t.name not in CONSUMED)


def file_type(reader) -> str:
    """The quantization names the file's matrices use, most common first (e.g. 'Q4_1, Q8_0')."""
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        if len(tensor.shape) > 1:
            counts[_tensor_type_name(tensor)] = counts.get(_tensor_type_name(tensor), 0) + 1
    return ", ".join(sorted(counts, key=lambda k: -counts[k]))
