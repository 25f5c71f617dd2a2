"""Random-weight Llama-3-shaped checkpoints in Hugging Face format, for benchmarks.

Written with safetensors directly (no transformers needed). ``qk_scale`` multiplies the
q/k projections so attention is peaked like a trained model's rather than flat.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_random_llama(folder: Path, *, hidden: int = 256, layers: int = 4, heads: int = 4, kv_heads: int = 1,
                       intermediate: int = 768, vocab: int = 8192, max_positions: int = 4096,
                       qk_scale: float = 1.0, seed: int = 0, std: float = 0.05) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std * scale

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden, scale=20), "model.norm.weight": torch.ones(hidden),
               "lm_head.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden, scale=qk_scale),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden, scale=qk_scale),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate),
        })
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
