"""Small random Hugging Face checkpoints, written by the tests themselves.

transformers is the oracle: it builds and saves the checkpoint, and its own forward pass
is what cormlm must reproduce.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            initializer_range=0.08, bos_token_id=None, eos_token_id=None, pad_token_id=None)


FALCON_BASE = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   initializer_range=0.08, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                   max_position_embeddings=256)


def save_hf_model(folder: Path, model_type: str = "llama", dtype: torch.dtype = torch.float32,
                  max_shard_size: str | None = None, seed: int = 0, **overrides: Any) -> Path:
    """Build a random transformers model of ``model_type`` and save it in HF format."""
    import transformers

    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "falcon": (transformers.FalconConfig, transformers.FalconForCausalLM)}
    config_cls, model_cls = classes[model_type]
    base = FALCON_BASE if model_type == "falcon" else BASE
    config = config_cls(**{**base, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def load_hf_model(folder: Path, dtype: torch.dtype = torch.float32):
    """transformers' default (SDPA) attention. Its eager Falcon path adds the ALiBi bias twice
    (once itself, once through the mask it builds) in transformers 5.23, so it is no oracle."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def rewrite_config(folder: Path, edit) -> dict:
    """Apply ``edit(dict) -> dict`` to config.json in place; returns the new config."""
    path = folder / "config.json"
    config = edit(json.loads(path.read_text()))
    path.write_text(json.dumps(config, indent=2))
    return config


def to_transformers4_rope(config: dict, key: str = "rope_type") -> dict:
    """Rewrite transformers-5 ``rope_parameters`` as transformers-4 ``rope_theta`` + ``rope_scaling``."""
    params = dict(config.pop("rope_parameters"))
    config["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type", "default")
    config["rope_scaling"] = None if rope_type == "default" else {key: rope_type, **params}
    return config


def make_peaky_checkpoint(folder: Path, factor: float = 3.0, **overrides) -> Path:
    """save_hf_model, then q_proj / k_proj weights times ``factor`` (peaked attention, so that
    policies evict), re-saved under HF names."""
    save_hf_model(folder, **overrides)
    path = folder / "model.safetensors"
    weights = load_file(path)
    for name in weights:
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            weights[name] = (weights[name] * factor).contiguous()
    save_file(weights, path, metadata={"format": "pt"})
    return folder


# ---------------------------------------------------------------------- Falcon (CORM tests)

FALCON_HIDDEN = 64
FALCON_PEAKY = 3.0  # scale of the q and k rows of query_key_value

# name -> (config overrides, KV heads, fused QKV layout); 4 heads unless overridden
FALCON_LAYOUTS = {
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


def _falcon_heads(name: str) -> int:
    return FALCON_LAYOUTS[name][0].get("num_attention_heads", 4)


def _qk_rows(layout: str, heads: int, kv_heads: int) -> torch.Tensor:
    """Boolean mask over the rows of query_key_value: True on the q and k rows."""
    d = FALCON_HIDDEN // heads
    if layout == "multi_query":
        rows = (heads + 2) * d
        return torch.arange(rows) < (heads + 1) * d
    if layout == "interleaved":
        return (torch.arange(3 * heads * d) // d) % 3 < 2
    per = heads // kv_heads
    return (torch.arange((per + 2) * kv_heads * d) // d) % (per + 2) < per + 1


def make_falcon_checkpoint(folder: Path, name: str, factor: float = FALCON_PEAKY, seed: int = 0) -> Path:
    """A tiny random Falcon of layout ``name`` with peaky attention (q and k rows of
    query_key_value scaled up, so that CORM really evicts) and randomised LayerNorm weights /
    biases and linear biases (transformers initialises them to 1 / 0, which would hide a
    missing one)."""
    overrides, kv_heads, layout = FALCON_LAYOUTS[name]
    save_hf_model(folder, model_type="falcon", **overrides)
    path = folder / "model.safetensors"
    weights = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    qk = _qk_rows(layout, _falcon_heads(name), kv_heads)
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


# Llama 2's sentencepiece trainer options: identity normalisation, no whitespace collapsing,
# byte fallback (every character round-trips), digits split, <unk>/<s>/</s> = 0/1/2, no pad.
LLAMA2_SENTENCEPIECE_OPTIONS = dict(
    model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
    remove_extra_whitespaces=False, byte_fallback=True, split_digits=True, character_coverage=1.0,
    allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
)
