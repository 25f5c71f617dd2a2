"""Small random Hugging Face checkpoints, written by the tests themselves.

transformers is the oracle: it builds and saves the checkpoint, and its own forward pass
is what cormlm must reproduce.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

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
    from safetensors.torch import load_file, save_file

    save_hf_model(folder, **overrides)
    path = folder / "model.safetensors"
    weights = load_file(path)
    for name in weights:
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            weights[name] = (weights[name] * factor).contiguous()
    save_file(weights, path, metadata={"format": "pt"})
    return folder
