"""Autoregressive generation on top of ``model(input_ids, cache=cache)``.

The prompt is prefilled in one call (left-padded batches carry an attention mask), then
one token per row per step goes through the same call, so every cache policy sees exactly
what a user's own loop would give it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .cache import CacheConfig, KVCache, make_cache
from .errors import InputError
from .sampling import SamplingConfig, next_tokens


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [B, T + steps]; rows that stopped early are padded with pad_token_id
    sequences: list[list[int]]  # per row: prompt (padding removed) + generated ids, EOS included
    new_tokens: list[list[int]]  # per row: generated ids only, EOS included
    cache: KVCache
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prompt_lengths: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max((len(t) for t in self.new_tokens), default=0) - 1
        return steps * len(self.new_tokens) / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else 0.0


def _stop_ids(model: torch.nn.Module, eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return list(model.config.eos_token_ids)
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def pad_prompts(prompts: Sequence[int] | Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-id lists as a left-padded batch [B, T] and its mask (None when no row is padded)."""
    rows = [list(prompts)] if prompts and all(isinstance(x, int) for x in prompts) else [list(r) for r in prompts]
    if not rows or any(not row for row in rows) or not all(isinstance(x, int) for row in rows for x in row):
        raise InputError("input_ids must be a non-empty list of token ids, or a list of such lists (one per row)")
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    if all(len(row) == width for row in rows):
        return ids, None
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


def prefill(model: torch.nn.Module, input_ids: torch.Tensor, valid: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    """Last-position logits of the prompt, fed in one call, or in chunks of ``cache.prefill_chunk``
    tokens (each chunk a step of its own: the policy evicts between chunks)."""
    chunk = cache.prefill_chunk or input_ids.shape[1]
    logits = None
    for start in range(0, input_ids.shape[1], chunk):
        part = None if valid is None else valid[:, start:start + chunk]
        if part is not None and bool(part.all()):
            part = None
        logits = model.forward_unchecked(input_ids[:, start:start + chunk], part, cache, last_logits_only=True)
    return logits


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    cache: CacheConfig | KVCache | None = None,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` per row; a row stops at its first stop token.

    ``eos_token_id`` defaults to the checkpoint's stop ids (generation_config.json);
    pass ``[]`` to never stop early. ``on_tokens`` receives each step's [B] new ids
    (for streaming). The cache (a CacheConfig, or a cache from ``make_cache``) is
    returned in the output for inspection.
    """
    sampling = SamplingConfig(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor):
        if attention_mask is not None:
            raise InputError("attention_mask goes with a tensor of input_ids; with lists of token ids, "
                             "rows of different lengths are padded for you")
        input_ids, attention_mask = pad_prompts(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else attention_mask[None]
    input_ids = input_ids.to(model.device)
    attention_mask = None if attention_mask is None else attention_mask.to(model.device)
    batch = input_ids.shape[0]
    if not isinstance(cache, KVCache):
        cache = make_cache(model, cache, batch)
    valid = model.check_inputs(input_ids, attention_mask, cache)
    prompt_lengths = [input_ids.shape[1]] * batch if valid is None else [int(n) for n in valid.sum(dim=1)]
    limit = model.config.context_length
    if cache.max_length + max(prompt_lengths) + max_new_tokens > limit:
        raise InputError(
            f"prompt ({max(prompt_lengths)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {limit} tokens; shorten the prompt or lower max_new_tokens"
        )
    stop = torch.tensor(_stop_ids(model, eos_token_id), dtype=torch.long, device=model.device)
    pad = pad_token_id if pad_token_id is not None else (
        model.config.pad_token_id if model.config.pad_token_id is not None else (int(stop[0]) if len(stop) else 0))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)

    start = time.perf_counter()
    logits = prefill(model, input_ids, valid, cache)
    steps: list[torch.Tensor] = []
    finished = torch.zeros(batch, dtype=torch.bool, device=model.device)
    prefill_done = time.perf_counter()
    tp = getattr(model, "tp", None)
    for step in range(max_new_tokens):
        token = next_tokens(logits[:, -1].float(), sampling, generator)
        if tp is not None and not sampling.greedy:  # one sampled token for every rank: rank 0's
            token = tp.broadcast(token)
        token = token.masked_fill(finished, pad)
        steps.append(token)
        if on_tokens is not None:
            on_tokens(token)
        finished |= torch.isin(token, stop)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = model.forward_unchecked(token[:, None], None, cache, last_logits_only=True)
    end = time.perf_counter()

    generated = torch.stack(steps, dim=1) if steps else input_ids.new_zeros(batch, 0)
    stop_set = set(stop.tolist())
    new_tokens = []
    for row in generated.tolist():
        ends = [i for i, tok in enumerate(row) if tok in stop_set]
        new_tokens.append(row[: ends[0] + 1] if ends else row)
    keep = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid
    prompts = [[t for t, k in zip(ids, ks) if k] for ids, ks in zip(input_ids.tolist(), keep.tolist())]
    return GenerationOutput(
        tokens=torch.cat([input_ids, generated], dim=1),
        sequences=[p + g for p, g in zip(prompts, new_tokens)],
        new_tokens=new_tokens,
        cache=cache,
        prefill_seconds=prefill_done - start,
        decode_seconds=end - prefill_done,
        prompt_lengths=prompt_lengths,
    )
