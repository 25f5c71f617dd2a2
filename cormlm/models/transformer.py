"""The decoder-only transformer shared by every family.

One :class:`Block` covers sequential residuals (Llama, Mistral, Falcon-RW) and parallel
attention + MLP with one or two norms (Falcon); which one is configuration data.

Under tensor parallelism (``CausalLM(config, tp)``, see ``cormlm.parallel``) the same modules
are built at the rank's size: its query and KV heads, its MLP columns and vocabulary rows.
The output and down projections then hold partial sums, which the block all-reduces (once
per block half; once for both halves of a parallel block) before adding their biases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import InputError
from . import decode_block, prompt_blocks
from .alibi import alibi_slopes
from .attention import Attention, StepContext
from .linear import Linear
from .mlp import make_mlp
from .norms import add_and_norm, make_norm
from .rope import RotaryEmbedding

if TYPE_CHECKING:
    from ..cache.base import KVCache
    from ..parallel.group import TensorParallel

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _plus_bias(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    return x if linear.bias is None else x + linear.bias


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int, reduce: Reduce | None = None) -> None:
        super().__init__()
        self.reduce = reduce  # tensor parallelism: sums the ranks' partial projections
        self.parallel = config.residual == "parallel"
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, index)
        self.mlp = make_mlp(config)
        has_mlp_norm = not self.parallel or config.parallel_norms == 2
        self.mlp_norm = make_norm(config) if has_mlp_norm else None
        # compile_model: (pre_attention, post_attention) compiled for prompts (run where they
        # measure faster than the modules: prompt_blocks); a traced decode step inlines the
        # plain methods instead (its saved form must not refer to these)
        self.prompt_graphs: tuple[Callable, Callable] | None = None
        self.native_shape = decode_block.shaped_for(config, sharded=reduce is not None)  # see decode_block
        self.native_memo: tuple | None = None  # decode_block.choose's settled path, per call kind
        self.native_plan: tuple | None = None  # decode_block's arguments of its calls, per epoch

    def _apply(self, fn, recurse=True):
        decode_block.changed()  # (.to(), .float(), ...: its parameters may no longer fit the C calls)
        return super()._apply(fn, recurse)

    def pre_attention(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything before attention: the normed input and q, k, v (dense: compiled whole)."""
        h = self.attn_norm(x)
        return (h, *self.attn.project(h, rotary))

    def post_attention(self, x: torch.Tensor, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Everything after attention: output projection, MLP and residuals (dense: compiled whole)."""
        if self.reduce is not None:
            return self._post_attention_sharded(x, h, attn_out)
        attn = self.attn.output(attn_out)
        if not self.parallel:
            x, normed = add_and_norm(self.mlp_norm, x, attn)
            return self.mlp.added_to(x, normed)  # x is this call's own: added into in place
        mlp_in = h if self.mlp_norm is None else self.mlp_norm(x)
        return x + (self.mlp(mlp_in) + attn)

    def _post_attention_sharded(self, x: torch.Tensor, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """``post_attention`` on a rank: its heads' and MLP columns' partial projections, summed
        over the ranks, each bias added once after the sum."""
        o_proj, down = self.attn.o_proj, self.mlp.down
        attn = self.attn.output(attn_out, bias=False)
        if not self.parallel:
            x = x + _plus_bias(self.reduce(attn), o_proj)
            return x + _plus_bias(self.reduce(self.mlp(self.mlp_norm(x), bias=False)), down)
        mlp_in = h if self.mlp_norm is None else self.mlp_norm(x)
        both = self.reduce(self.mlp(mlp_in, bias=False) + attn)  # one all-reduce for both halves
        return x + _plus_bias(_plus_bias(both, down), o_proj)

    def forward(self, x: torch.Tensor, step: StepContext, last_only: bool = False) -> torch.Tensor:
        """The block's output for every token, or with ``last_only`` for the last one alone
        (keys and values of every token are still made and cached)."""
        if not last_only and self.native_shape:  # a decode step's few rows may take decode_block's C calls
            path, trial = decode_block.choose(self, x, step.rotary)
            if path == "native" or trial is not None:
                return decode_block.forward(self, x, step, path, trial)
        pre, post = self.pre_attention, self.post_attention
        if self.prompt_graphs is not None and not torch.compiler.is_compiling():
            pre, post = prompt_blocks.measured_halves(self)  # each half: its graph or modules, as measured
        h, q, k, v = pre(x, step.rotary)
        if not last_only:
            return post(x, h, self.attn.attend(q, k, v, step))
        out = self.attn.attend(q, k, v, step, out_rows=1)
        return post(x[:, -1:], h[:, -1:], out)


class CausalLM(nn.Module):
    """Embeddings, blocks, final norm and LM head; ``forward`` returns logits.

    ``tp`` (a :class:`cormlm.parallel.TensorParallel`) builds this rank's shard; ``config``
    stays the whole model's, ``local_config`` is the shard's (its heads and MLP columns).
    """

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.local_config = config if tp is None else tp.plan.local_config()
        self.compiled = False  # set by cormlm.compile.compile_model; caches made afterwards compile too
        self.compiled_decode = None  # compile_model: body as one graph for decode steps
        self.compiled_head = None  # compile_model: head compiled for prompts (a traced step inlines head)
        if tp is None:
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        else:
            from ..parallel.layers import VocabShardEmbedding
            self.embed = VocabShardEmbedding(tp.plan.vocab, config.hidden_size, tp.plan.vocab_start, tp.all_reduce)
        reduce = None if tp is None else tp.all_reduce
        self.blocks = nn.ModuleList(Block(self.local_config, i, reduce) for i in range(config.num_layers))
        self.final_norm = make_norm(config)
        self.lm_head = Linear(config.hidden_size, self.embed.num_embeddings, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = RotaryEmbedding(config) if config.position == "rope" else None
        if config.position == "alibi":
            self.reset_derived_buffers()

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def reset_derived_buffers(self) -> None:
        """Recompute buffers derived from the config (not stored in checkpoints)."""
        if self.rotary is not None:
            self.rotary.reset_buffers(self.device)
        if self.config.position == "alibi":
            slopes = alibi_slopes(self.config.num_heads, self.device)
            if self.tp is not None:  # this rank's heads' slopes
                slopes = slopes[self.tp.plan.head_start:self.tp.plan.head_start + self.tp.plan.heads]
            for block in self.blocks:
                block.attn.alibi_slopes = slopes

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_logits_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with ``last_logits_only``).

        ``attention_mask`` [B, T] marks real tokens with 1 and padding with 0 (left
        padding for batches of different lengths). With a ``cache``, the tokens are
        appended to it and may be evicted by its policy.
        """
        if isinstance(input_ids, torch.Tensor) and input_ids.device != self.device:
            input_ids = input_ids.to(self.device)
        valid = self.check_inputs(input_ids, attention_mask, cache)
        return self.forward_unchecked(input_ids, valid, cache, last_logits_only)

    def check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor | None:
        """Validate a call's inputs; return the padding mask as bool (None when unpadded)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise InputError(f"input_ids must be a 2-D tensor [batch, tokens], got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise InputError("input_ids is empty: give at least one token")
        vocab = self.config.vocab_size
        bad = (input_ids < 0) | (input_ids >= vocab)
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise InputError(
                f"token id {int(input_ids[b, t])} at [batch {b}, position {t}] is outside the vocabulary "
                f"(ids must be in 0..{vocab - 1}); was the prompt encoded with this model's tokenizer?"
            )
        valid = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise InputError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                    f"{tuple(input_ids.shape)}; they must match"
                )
            valid = attention_mask.to(device=input_ids.device) != 0
            if bool(valid.all()):
                valid = None
        if cache is not None:
            if cache.batch_size != input_ids.shape[0]:
                raise InputError(
                    f"the cache was made for batch size {cache.batch_size} but input_ids has "
                    f"{input_ids.shape[0]} rows; make a cache per batch with cormlm.make_cache"
                )
            if cache.num_layers != self.config.num_layers:
                raise InputError("this cache was made for a different model; use cormlm.make_cache(model, ...)")
        seen = 0 if cache is None else cache.max_length
        new = input_ids.shape[1] if valid is None else int(valid.sum(dim=1).max())
        limit = self.config.context_length
        if seen + new > limit:
            raise InputError(
                f"the sequence would be {seen + new} tokens long but the model accepts at most {limit} "
                f"(max_position_embeddings); shorten the prompt or lower max_new_tokens"
            )
        return valid

    def forward_unchecked(
        self,
        input_ids: torch.Tensor,
        valid: torch.Tensor | None,
        cache: KVCache | None = None,
        last_logits_only: bool = False,
    ) -> torch.Tensor:
        """The forward pass without input checks (decode loops that made their own ids): one
        step of the cache protocol, ``begin_step``, every layer's ``attend``, ``end_step``."""
        b, t = input_ids.shape
        if cache is not None:
            positions, max_position = cache.begin_step(valid, t)
        elif valid is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
            max_position = t - 1
        else:
            positions = valid.long().cumsum(dim=1) - 1
            positions = positions.masked_fill(~valid, -1)
            max_position = int(positions.max())
        decode = cache is not None and t == 1 and valid is None
        body = self.compiled_decode if decode and self.compiled_decode is not None else self.body
        logits = body(input_ids, positions, max_position, cache, cache is None and valid is None, last_logits_only)
        if cache is not None:
            cache.end_step()
        return logits

    def body(self, input_ids: torch.Tensor, positions: torch.Tensor, max_position: int, cache: KVCache | None,
             plain_causal: bool = False, last_logits_only: bool = False) -> torch.Tensor:
        """Every layer between the cache's begin_step and end_step: cache appends, attention,
        policy updates and evictions included. A decode step is tensor operations only, so
        that ``cormlm.compile_model`` compiles it as one graph."""
        rotary = self.rotary(positions, max_position, self.dtype) if self.rotary is not None else None
        step = StepContext(positions, rotary, cache, plain_causal=plain_causal)
        x = self.embed(input_ids)
        # wanting only the last logits, the last block needs only the last token's output
        # (a prompt then skips that block's output projection, MLP and most of its attention)
        last_only = last_logits_only and input_ids.shape[1] > 1
        for i, block in enumerate(self.blocks):
            x = block(x, step, last_only and i == len(self.blocks) - 1)
        if last_logits_only:
            x = x[:, -1:]
        if torch.compiler.is_compiling() or self.compiled_head is None:
            return self.head(x)
        return self.compiled_head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: logits for the hidden states ``x`` (every rank: the whole vocabulary)."""
        logits = self.lm_head(self.final_norm(x))
        return logits if self.tp is None else self.tp.gather_vocab(logits)
