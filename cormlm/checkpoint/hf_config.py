"""Reading a checkpoint's config.json (and generation_config.json) into a :class:`ModelConfig`.

``from_hf_config`` is the only place that knows how each family's config.json spells
things (transformers 4 and 5 styles, Falcon's legacy RefinedWeb keys).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ModelConfig, RopeConfig
from ..errors import CheckpointNotFoundError, ConfigError, UnsupportedModelError
from .jsonfiles import read_json, read_optional_json

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _require(cfg: dict[str, Any], key: str, source: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{source}: missing required field '{key}'")
    return cfg[key]


def _positive_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{source}: '{name}' must be a positive integer, got {value!r}")
    return value


def parse_rope(cfg: dict[str, Any], source: str, max_positions: int) -> RopeConfig:
    """Normalise RoPE settings from transformers-4 style (``rope_theta`` + ``rope_scaling``
    with ``type`` or ``rope_type``) or transformers-5 style (``rope_parameters``)."""
    params: dict[str, Any] = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(scaling, dict) or not isinstance(params, dict):
        raise ConfigError(f"{source}: 'rope_scaling' / 'rope_parameters' must be JSON objects")
    for key, value in scaling.items():
        params.setdefault(key, value)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: RoPE type '{rope_type}' is not supported; supported types: {', '.join(ROPE_TYPES)}"
        )
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0
    original = params.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    factor = params.get("factor")
    if rope_type == "yarn" and factor is None:
        if original is None:
            raise ConfigError(f"{source}: yarn RoPE needs 'factor' or 'original_max_position_embeddings'")
        factor = max_positions / original
    if rope_type != "default":
        if factor is None:
            raise ConfigError(f"{source}: RoPE type '{rope_type}' needs a 'factor'")
        if not isinstance(factor, (int, float)) or factor <= 0 or not math.isfinite(factor):
            raise ConfigError(f"{source}: RoPE 'factor' must be a positive number, got {factor!r}")
    if rope_type in ("llama3", "yarn") and original is None:
        original = max_positions
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=float(factor if factor is not None else 1.0),
        partial_rotary_factor=float(partial),
        original_max_position_embeddings=None if original is None else int(original),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def token_ids(value: Any, key: str, source: str, vocab_size: int) -> tuple[int, ...]:
    """One token id or a list of them (``eos_token_id`` in config.json and generation_config.json),
    checked against the vocabulary: the one parser of stop ids, for the model and its tokenizer."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{source}: {key} must be an integer token id, got {v!r}")
        if not 0 <= v < vocab_size:
            raise ConfigError(f"{source}: {key} {v} is outside the vocabulary (vocab size {vocab_size})")
    return tuple(values)


def _heads(cfg: dict[str, Any], source: str, heads_key: str, kv_heads: Any) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim), checked: heads must split evenly over KV heads."""
    hidden = _positive_int(_require(cfg, "hidden_size", source), "hidden_size", source)
    heads = _positive_int(_require(cfg, heads_key, source), heads_key, source)
    kv_heads = _positive_int(kv_heads or heads, "number of KV heads", source)
    if heads % kv_heads:
        raise ConfigError(
            f"{source}: {heads_key} ({heads}) must be a multiple of the number of KV heads ({kv_heads})"
        )
    head_dim = cfg.get("head_dim")
    if not head_dim:
        if hidden % heads:
            raise ConfigError(f"{source}: hidden_size ({hidden}) is not divisible by {heads_key} ({heads})")
        head_dim = hidden // heads
    return heads, kv_heads, _positive_int(head_dim, "head_dim", source)


def _shared_fields(cfg: dict[str, Any], source: str, family: str, hidden: int,
                   heads: tuple[int, int, int]) -> dict[str, Any]:
    """The fields every family reads the same way: sizes, special token ids, stored dtype."""
    num_heads, kv_heads, head_dim = heads
    vocab_size = _positive_int(_require(cfg, "vocab_size", source), "vocab_size", source)
    return dict(
        family=family,
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=_positive_int(_require(cfg, "num_hidden_layers", source), "num_hidden_layers", source),
        num_heads=num_heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=token_ids(cfg.get("eos_token_id"), "eos_token_id", source, vocab_size),
        pad_token_id=cfg.get("pad_token_id"),
        stored_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
    )


def _llama_like(cfg: dict[str, Any], source: str, family: str) -> ModelConfig:
    hidden = _positive_int(_require(cfg, "hidden_size", source), "hidden_size", source)
    heads, kv_heads, head_dim = _heads(cfg, source, "num_attention_heads", cfg.get("num_key_value_heads"))
    max_pos = _positive_int(cfg.get("max_position_embeddings", 2048), "max_position_embeddings", source)
    sliding = cfg.get("sliding_window") if family == "mistral" else None
    if cfg.get("use_sliding_window") is False:
        sliding = None
    act = _activation(cfg.get("hidden_act", "silu"), source)
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        **_shared_fields(cfg, source, family, hidden, (heads, kv_heads, head_dim)),
        intermediate_size=_positive_int(_require(cfg, "intermediate_size", source), "intermediate_size", source),
        max_position_embeddings=max_pos,
        norm="rms",
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        mlp="gated",
        activation=act,
        residual="sequential",
        position="rope",
        rope=parse_rope(cfg, source, max_pos),
        attention_bias=attention_bias,
        attention_out_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=None if sliding is None else _positive_int(sliding, "sliding_window", source),
    )


ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


def _activation(name: str, source: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(f"{source}: activation '{name}' is not supported; supported: {', '.join(ACTIVATIONS)}")
    return name


# Falcon's legacy RefinedWeb configs spell the same fields differently.
FALCON_LEGACY_KEYS = {"n_head": "num_attention_heads", "n_layer": "num_hidden_layers", "n_head_kv": "num_kv_heads",
                      "n_embed": "hidden_size"}
FALCON_LAYOUTS = (
    "Falcon-7B style (multi_query, parallel_attn, one LayerNorm)",
    "Falcon-40B/180B (new_decoder_architecture, num_ln_in_parallel_attn 2)",
    "Falcon 2 (new_decoder_architecture, parallel_attn, num_ln_in_parallel_attn 1)",
    "Falcon-RW (sequential, alibi or rotary, optional bias)",
)


def _falcon(cfg: dict[str, Any], source: str, model_type: str) -> ModelConfig:
    """Falcon, including the legacy RefinedWeb (40B) / RefinedWebModel (7B) configs."""
    cfg = {FALCON_LEGACY_KEYS.get(key, key): value for key, value in cfg.items()}
    new_arch = bool(cfg.get("new_decoder_architecture", model_type == "RefinedWeb"))
    multi_query = bool(cfg.get("multi_query", True))
    parallel = bool(cfg.get("parallel_attn", True))
    alibi = bool(cfg.get("alibi", False))
    norms = cfg.get("num_ln_in_parallel_attn")
    if norms is None:
        norms = 2 if new_arch else 1
    unknown = None
    if norms not in (1, 2):
        unknown = f"num_ln_in_parallel_attn={norms!r}"
    elif new_arch and not parallel and norms == 1:
        unknown = "new_decoder_architecture with parallel_attn=false and one LayerNorm"
    elif new_arch and alibi:
        unknown = "new_decoder_architecture with alibi"
    if unknown:
        raise UnsupportedModelError(
            f"{source}: unknown Falcon variant ({unknown}); supported layouts: {'; '.join(FALCON_LAYOUTS)}"
        )
    if new_arch:
        kv_heads, layout = cfg.get("num_kv_heads"), "falcon_grouped"
    elif multi_query:
        kv_heads, layout = 1, "falcon_multi_query"
    else:
        kv_heads, layout = cfg.get("num_kv_heads"), "falcon_interleaved"
        if kv_heads and kv_heads != cfg.get("num_attention_heads"):
            raise UnsupportedModelError(
                f"{source}: unknown Falcon variant (num_kv_heads={kv_heads} without new_decoder_architecture or "
                f"multi_query); supported layouts: {'; '.join(FALCON_LAYOUTS)}"
            )
    hidden = _positive_int(_require(cfg, "hidden_size", source), "hidden_size", source)
    heads, kv_heads, head_dim = _heads({**cfg, "head_dim": None}, source, "num_attention_heads", kv_heads)
    max_pos = _positive_int(cfg.get("max_position_embeddings", 2048), "max_position_embeddings", source)
    bias = bool(cfg.get("bias", False))
    return ModelConfig(
        **_shared_fields(cfg, source, "falcon", hidden, (heads, kv_heads, head_dim)),
        intermediate_size=_positive_int(cfg.get("ffn_hidden_size") or 4 * hidden, "ffn_hidden_size", source),
        max_position_embeddings=max_pos,
        norm="layer",
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        mlp="plain",
        activation=_activation(cfg.get("activation", "gelu"), source),
        residual="parallel" if (parallel or new_arch) else "sequential",
        parallel_norms=norms if new_arch else 1,
        position="alibi" if alibi else "rope",
        rope=parse_rope(cfg, source, max_pos),
        qkv_layout=layout,
        attention_bias=bias,
        attention_out_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
    )


FAMILY_PARSERS: dict[str, Callable[[dict[str, Any], str], ModelConfig]] = {
    "llama": lambda cfg, src: _llama_like(cfg, src, "llama"),
    "mistral": lambda cfg, src: _llama_like(cfg, src, "mistral"),
    "falcon": lambda cfg, src: _falcon(cfg, src, "falcon"),
    "RefinedWeb": lambda cfg, src: _falcon(cfg, src, "RefinedWeb"),
    "RefinedWebModel": lambda cfg, src: _falcon(cfg, src, "RefinedWebModel"),
}


def supported_model_types() -> list[str]:
    return sorted(FAMILY_PARSERS)


def from_hf_config(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a :class:`ModelConfig` from a parsed config.json."""
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ConfigError(
            f"{source}: no 'model_type' field; supported model types: {', '.join(supported_model_types())}"
        )
    parser = FAMILY_PARSERS.get(model_type)
    if parser is None:
        raise UnsupportedModelError(
            f"{source}: model_type '{model_type}' is not supported; "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    return parser(cfg, source)


def load_config(folder: Path) -> ModelConfig:
    """Read config.json (and generation_config.json for stop tokens) from a checkpoint folder."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{folder} has no config.json; pass the folder of a Hugging Face checkpoint "
            "(config.json + *.safetensors)"
        )
    config = from_hf_config(read_json(path), str(path))
    generation = read_optional_json(folder / "generation_config.json")
    eos = token_ids(generation.get("eos_token_id"), "eos_token_id", str(folder / "generation_config.json"),
                    config.vocab_size) or config.eos_token_ids
    bos = generation.get("bos_token_id", config.bos_token_id)
    pad = generation.get("pad_token_id", config.pad_token_id)
    return config.replace(eos_token_ids=eos, bos_token_id=bos, pad_token_id=pad)
