"""Random-weight Llama-3-shaped checkpoints, written by cormlm's own ``save_pretrained``: the
benchmarks' model of any size (no download, no transformers needed).

``qk_scale`` multiplies the q/k projections so that attention is peaked like a trained
model's rather than flat (with flat attention CORM would, correctly, keep almost everything).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig, RopeConfig
from ..models.transformer import CausalLM
from .save import save_pretrained


def write_random_llama(folder: Path, *, hidden: int = 256, layers: int = 4, heads: int = 4, kv_heads: int = 1,
                       intermediate: int = 768, vocab: int = 8192, max_positions: int = 4096,
                       qk_scale: float = 1.0, seed: int = 0, std: float = 0.05) -> Path:
    """A float32 Hugging Face checkpoint in ``folder``: weights N(0, std) (embeddings 20x, norms 1)."""
    config = ModelConfig(family="llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                         num_kv_heads=kv_heads, head_dim=hidden // heads, intermediate_size=intermediate,
                         max_position_embeddings=max_positions, rope=RopeConfig(theta=500000.0))
    gen = torch.Generator().manual_seed(seed)
    model = CausalLM(config)
    q_and_k = (heads + kv_heads) * config.head_dim  # the fused qkv's first rows
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            param.copy_(torch.randn(param.shape, generator=gen) * std * (20 if name == "embed.weight" else 1))
            if name.endswith("attn.qkv.weight"):
                param[:q_and_k] *= qk_scale
    save_pretrained(model, folder, dtype=torch.float32)
    return folder
