"""How each family's Hugging Face tensor names map onto cormlm's parameters.

A :class:`ParamSource` says which checkpoint tensors (with their expected shapes) make one
of our parameters and how they combine (q/k/v into one fused projection, gate/up into one
MLP matrix). The loader checks names and shapes against this plan before reading data, so
a missing tensor or a shape mismatch is reported by name with the shape expected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import ModelConfig

Combine = Callable[[list[torch.Tensor]], torch.Tensor]


def _single(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _concat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


@dataclass(frozen=True)
class ParamSource:
    target: str  # our parameter name, e.g. "blocks.0.attn.qkv.weight"
    sources: tuple[tuple[str, tuple[int, ...]], ...]  # (checkpoint name, expected shape)
    combine: Combine = _single
    # the source row behind each row of the target, when it is a reordering of one tensor
    # (Falcon's fused QKV); None: the sources' rows concatenated in order
    row_order: torch.Tensor | None = None


# Tensors some checkpoints carry that hold nothing we need (derived buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".masked_bias", ".attn.bias")


def llama_layout(config: ModelConfig) -> list[ParamSource]:
    """Llama 2 / 3.x and Mistral: ``model.layers.N.self_attn.q_proj.weight`` and friends."""
    h, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    plan = [ParamSource("embed.weight", (("model.embed_tokens.weight", (config.vocab_size, h)),)),
            ParamSource("final_norm.weight", (("model.norm.weight", (h,)),))]
    if not config.tie_word_embeddings:
        plan.append(ParamSource("lm_head.weight", (("lm_head.weight", (config.vocab_size, h)),)))
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        attn, mlp = src + "self_attn.", src + "mlp."
        plan += [
            ParamSource(dst + "attn_norm.weight", ((src + "input_layernorm.weight", (h,)),)),
            ParamSource(dst + "mlp_norm.weight", ((src + "post_attention_layernorm.weight", (h,)),)),
            ParamSource(dst + "attn.qkv.weight", ((attn + "q_proj.weight", (q, h)), (attn + "k_proj.weight", (kv, h)),
                                                  (attn + "v_proj.weight", (kv, h))), _concat_rows),
            ParamSource(dst + "attn.o_proj.weight", ((attn + "o_proj.weight", (h, q)),)),
            ParamSource(dst + "mlp.gate_up.weight", ((mlp + "gate_proj.weight", (inter, h)),
                                                     (mlp + "up_proj.weight", (inter, h))), _concat_rows),
            ParamSource(dst + "mlp.down.weight", ((mlp + "down_proj.weight", (h, inter)),)),
        ]
        if config.attention_bias:
            plan.append(ParamSource(dst + "attn.qkv.bias", ((attn + "q_proj.bias", (q,)), (attn + "k_proj.bias", (kv,)),
                                                            (attn + "v_proj.bias", (kv,))), _concat_rows))
        if config.attention_out_bias:
            plan.append(ParamSource(dst + "attn.o_proj.bias", ((attn + "o_proj.bias", (h,)),)))
        if config.mlp_bias:
            plan += [
                ParamSource(dst + "mlp.gate_up.bias", ((mlp + "gate_proj.bias", (inter,)), (mlp + "up_proj.bias", (inter,))),
                            _concat_rows),
                ParamSource(dst + "mlp.down.bias", ((mlp + "down_proj.bias", (h,)),)),
            ]
    return plan


def falcon_qkv_order(config: ModelConfig) -> torch.Tensor:
    """Row ``i`` of cormlm's [q heads | k heads | v heads] is row ``order[i]`` of Falcon's fused
    query_key_value.

    Falcon stores three layouts: grouped (new decoder architecture: per KV group, its query
    heads then one key and one value head), multi-query (all query heads, then the one key
    and value head) and interleaved (per head: query, key, value).
    """
    heads, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
    rows = torch.arange((heads + 2 * kv) * d)
    if config.qkv_layout == "falcon_grouped":
        grouped = rows.reshape(kv, heads // kv + 2, d)
        q, k, v = grouped[:, :-2], grouped[:, -2], grouped[:, -1]
    elif config.qkv_layout == "falcon_multi_query":
        stacked = rows.reshape(heads + 2, d)
        q, k, v = stacked[:heads], stacked[heads], stacked[heads + 1]
    else:
        interleaved = rows.reshape(heads, 3, d)
        q, k, v = interleaved[:, 0], interleaved[:, 1], interleaved[:, 2]
    return torch.cat([x.reshape(-1) for x in (q, k, v)])


def split_falcon_qkv(config: ModelConfig) -> Combine:
    """Reorder Falcon's fused query_key_value rows into cormlm's [q heads | k heads | v heads]."""
    order = falcon_qkv_order(config)

    def combine(tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0].index_select(0, order.to(tensors[0].device))

    return combine


def falcon_layout(config: ModelConfig) -> list[ParamSource]:
    """Falcon (and RefinedWeb): ``transformer.h.N.self_attention.query_key_value.weight`` and friends."""
    h, inter = config.hidden_size, config.intermediate_size
    qkv_rows = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    plan = [ParamSource("embed.weight", (("transformer.word_embeddings.weight", (config.vocab_size, h)),)),
            ParamSource("final_norm.weight", (("transformer.ln_f.weight", (h,)),)),
            ParamSource("final_norm.bias", (("transformer.ln_f.bias", (h,)),))]
    if not config.tie_word_embeddings:
        plan.append(ParamSource("lm_head.weight", (("lm_head.weight", (config.vocab_size, h)),)))
    split, order = split_falcon_qkv(config), falcon_qkv_order(config)
    two_norms = config.residual == "parallel" and config.parallel_norms == 2
    for i in range(config.num_layers):
        src, dst = f"transformer.h.{i}.", f"blocks.{i}."
        if two_norms:
            norms = [("attn_norm", "ln_attn"), ("mlp_norm", "ln_mlp")]
        elif config.residual == "sequential":
            norms = [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")]
        else:
            norms = [("attn_norm", "input_layernorm")]
        linears = [("attn.qkv", "self_attention.query_key_value", (qkv_rows, h), split, order),
                   ("attn.o_proj", "self_attention.dense", (h, config.num_heads * config.head_dim), _single, None),
                   ("mlp.up", "mlp.dense_h_to_4h", (inter, h), _single, None),
                   ("mlp.down", "mlp.dense_4h_to_h", (h, inter), _single, None)]
        for ours, theirs in norms:
            for leaf in ("weight", "bias"):
                plan.append(ParamSource(f"{dst}{ours}.{leaf}", ((f"{src}{theirs}.{leaf}", (h,)),)))
        for ours, theirs, shape, combine, rows in linears:
            plan.append(ParamSource(f"{dst}{ours}.weight", ((f"{src}{theirs}.weight", shape),), combine, rows))
            if config.attention_bias:
                plan.append(ParamSource(f"{dst}{ours}.bias", ((f"{src}{theirs}.bias", shape[:1]),), combine, rows))
    return plan


LAYOUTS: dict[str, Callable[[ModelConfig], list[ParamSource]]] = {
    "llama": llama_layout,
    "mistral": llama_layout,
    "falcon": falcon_layout,
}


def checkpoint_layout(config: ModelConfig) -> list[ParamSource]:
    return LAYOUTS[config.family](config)


def is_ignorable(config: ModelConfig, name: str) -> bool:
    """Checkpoint tensors that may be present but carry nothing cormlm loads."""
    if name.endswith(IGNORED_SUFFIXES):
        return True
    # Tied checkpoints sometimes store the head anyway; the embedding is the source of truth.
    return config.tie_word_embeddings and name == "lm_head.weight"
