"""One model configuration for every family.

Families differ by data here (norm, MLP, residual style, positions, QKV layout), not by
copies of the model code. The model reads nothing but :class:`ModelConfig`; how each
family's config.json spells it is ``cormlm.checkpoint.hf_config``'s business.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, already normalised from either config.json style."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, element_size: int) -> int:
    """Keys + values of one token in every layer and KV head: what a full cache stores per token."""
    return 2 * num_layers * num_kv_heads * head_dim * element_size


@dataclass(frozen=True)
class ModelConfig:
    """Everything the shared model code needs to build any supported family."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-5
    mlp: str = "gated"  # "gated" (SwiGLU-style) | "plain"
    activation: str = "silu"
    residual: str = "sequential"  # "sequential" | "parallel"
    parallel_norms: int = 1  # parallel residual: 1 shared norm or 2 (ln_attn, ln_mlp)
    position: str = "rope"  # "rope" | "alibi"
    qkv_layout: str = "separate"  # how the checkpoint stores q/k/v: see checkpoint_layout
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention_bias: bool = False  # q, k, v projections
    attention_out_bias: bool = False  # o projection
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    stored_dtype: str | None = None  # config.json "torch_dtype" / "dtype"

    @property
    def group_size(self) -> int:
        """Query heads served by one KV head (1 = MHA, num_heads = MQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def context_length(self) -> int:
        """The longest sequence the model accepts.

        Dynamic-NTK RoPE exists to stretch a model past its trained length, so there the
        limit is ``factor`` times ``max_position_embeddings``; every other published format
        already stores the extended length in ``max_position_embeddings``.
        """
        if self.position == "rope" and self.rope.type == "dynamic":
            return int(self.max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings

    def kv_bytes_per_token(self, element_size: int) -> int:
        """Bytes one token's keys and values take across all layers in a full cache."""
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, element_size)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
