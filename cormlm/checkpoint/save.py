"""Saving a cormlm model as a Hugging Face checkpoint (config.json + safetensors).

The inverse of loading: every fused parameter is split back into the checkpoint tensors the
layout plan says it came from, so the result loads in cormlm and in transformers alike.
Used by the training script of the embedded model; only Llama-family configs are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..errors import CormlmError
from .layout import checkpoint_layout


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    if config.family != "llama":
        raise ValueError(f"saving is implemented for llama-family configs, not '{config.family}'")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.norm_eps,
        "hidden_act": config.activation, "rope_theta": config.rope.theta, "rope_scaling": None,
        "attention_bias": config.attention_bias, "mlp_bias": config.mlp_bias,
        "tie_word_embeddings": config.tie_word_embeddings, "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) > 1 else
        (config.eos_token_ids[0] if config.eos_token_ids else None),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_tensors(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors for ``model``, fused parameters split back apart."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for source in checkpoint_layout(model.config):
        tensor = params[source.target].detach().to("cpu", dtype)
        sizes = [shape[0] for _, shape in source.sources]
        for (name, shape), part in zip(source.sources, tensor.split(sizes, dim=0)):
            out[name] = part.reshape(shape).contiguous()
    return out


def save_pretrained(model: torch.nn.Module, folder: Path, dtype: torch.dtype = torch.bfloat16,
                    max_shard_bytes: int = 15 * 2**20) -> None:
    """Write config.json, generation_config.json and (sharded if large) safetensors."""
    from ..pack import is_packed

    if is_packed(model):  # before anything is written: nothing in the folder is replaced by half a save
        raise CormlmError("save_pretrained on a model with packed weights (pack_weights) cannot write the plain "
                          "weights; save the model before packing it")
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    (folder / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=2) + "\n")
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tensors = export_tensors(model, dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
