"""The ragged cache: one block pool per layer, one policy for all of them.

Per call and layer: the new tokens are appended to the pool; attention runs (decode: over
the pool directly, probabilities included; multi-token calls: SDPA, plus explicit scores
for only the query rows the policy needs); the policy updates its per-key state (an eager
decode step only keeps each layer's probabilities and updates every layer after the last).
After the last layer the policy evicts from every layer at once (a layer's pool is not read
again before the next call, so this is the rule's "after the step"): one pass over all
layers' pools instead of a dozen small operations per layer. A compiled decode step instead
updates and evicts each layer inside its graph, which fuses those operations with the
attention. Keys that a sliding window has left behind are dropped under every policy.
A prompt into an empty cache under a policy that evicts is the exception: its layers score
the prompt's own keys, decide the step's evictions at once and store only the survivors
(what storing all, evicting after the step and repacking would leave).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..models import prompt_attention
from ..models.attention_ops import (
    AttentionSpec,
    attend,
    attend_causal_with_lse,
    key_alibi_bias,
    sdpa_causal_with_lse,
    upcast,
    visibility_mask,
)
from .base import CacheStats, KVCache
from .paged import BlockPool, aligned_lead
from .paged_attention import decode_layer_observation, decode_layer_step
from .policy import EvictionPolicy, SlotView
from .slot_index import SlotIndex

COMPACT_CHECK_EVERY = 16  # decode steps between releases of emptied blocks to the free lists
# compact a pool holding more slots than this times its live keys: with positions and policy
# state (1.6% of a 64-dim float key + value) and bucket rounding, held bytes stay near 1.10x
COMPACT_SLACK = 1.06
# A decode step that must give a stream a fresh block (no free slot left in its own) gives one
# to each stream of that pool with fewer free slots than this share of a block too: their
# blocks come in the same round (a few operations per pool), not a step or two later.
EARLY_BLOCK_SHARE = 0.25
# Query rows a policy scores at once: as many as keep one [heads x rows x keys] float32 score
# matrix within SCORE_BYTES, at least SCORE_MIN_ROWS (products of fewer rows are slow). A
# memory bound first (256-row chunks made 300 MB of scores at batch 8 and 4k keys); a few MiB
# also keep the passes over it (softmax, the policy's reductions) mostly in cache.
SCORE_BYTES = 8 * 2**20
SCORE_MIN_ROWS = 16
# A prompt's scored rows' log-probabilities taken whole from cormlm's prompt kernel up to this
# size (a 1k prompt of SmolLM2 with w = 256: 3 MiB of group maxima, 9 MiB of heads); larger,
# they are scored in chunks as above
SCORED_BYTES = 64 * 2**20


def score_rows(heads: int, keys: int) -> int:
    """Rows per chunk of explicit scores for ``heads`` query heads (all rows) over ``keys`` keys."""
    return max(SCORE_MIN_ROWS, SCORE_BYTES // (4 * heads * max(keys, 1)))


def explicit_scores(q: torch.Tensor, keys_t: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                    spec: AttentionSpec, causal_start: int | None = None,
                    scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled scores [B, Hkv, G, Q, S] (float32, -inf for hidden keys) of a few query rows ``q``
    [B, Hq, Q, D], and which keys each row could see [B, Hkv, Q, S]. ``keys_t``: the keys
    transposed, [B, Hkv, D, S], made contiguous once for all chunks of rows (BLAS multiplies a
    contiguous operand faster than a transposed view, and the copy is paid once per layer,
    not per chunk).

    ``causal_start``: the keys are a prompt's own tokens at positions 0..S-1 (nothing cached
    before, no padding) and the rows consecutive positions from ``causal_start``, so that only
    the keys after it can be hidden: the mask is made and applied there alone. ``scratch``: a
    float32 buffer of at least the scores' size to write them into (float32 keys only).
    """
    b, hq, nq, d = q.shape
    g = spec.group_size
    # the scale on the few query rows, not on the [rows x keys] scores (the copy the reshape
    # makes of the strided queries anyway; exact for power-of-two scales such as 1/8)
    grouped = (q * spec.scale).reshape(b, spec.num_kv_heads, g * nq, d)
    s = keys_t.shape[-1]
    if scratch is not None and keys_t.dtype == torch.float32:
        scores = torch.matmul(grouped, keys_t, out=scratch[:grouped.shape[:-1].numel() * s].view(*grouped.shape[:-1], s))
    else:
        scores = upcast(torch.matmul(grouped, keys_t))
    scores = scores.view(b, spec.num_kv_heads, g, nq, s)
    if spec.alibi_slopes is not None:
        bias = key_alibi_bias(spec, k_pos)  # [B, Hq, 1, S]
        scores = scores + bias.view(b, spec.num_kv_heads, g, 1, -1)
    if causal_start is not None and spec.sliding_window is None:
        visible = causal_visible(causal_start, causal_start + nq, s, b, spec.num_kv_heads, scores.device)
        # only keys after causal_start can be hidden: that corner gets -inf added where a row
        # cannot see (a float addend broadcasts over the heads several times faster than a
        # boolean mask's fill; x + 0 = x), made from ``visible`` itself
        hidden = ~visible[0, 0, :, causal_start + 1:]
        corner = scores[..., causal_start + 1:]
        corner.add_(torch.zeros(hidden.shape, dtype=scores.dtype, device=scores.device).masked_fill_(hidden, float("-inf")))
        return scores, visible
    mask = visibility_mask(q_pos, k_pos, spec.sliding_window)  # [B, Hk, Q, S]
    scores.masked_fill_(~mask[:, :, None], float("-inf"))
    return scores, mask.expand(b, spec.num_kv_heads, nq, mask.shape[-1])


def causal_visible(start: int, stop: int, keys: int, batch: int, kv_heads: int, device: torch.device) -> torch.Tensor:
    """Which of a prompt's ``keys`` (positions 0..keys-1) its queries at positions start..stop-1
    see, [B, Hkv, Q, S] (an expanded view)."""
    visible = torch.arange(keys, device=device) <= torch.arange(start, stop, device=device)[:, None]
    return visible.expand(batch, kv_heads, stop - start, keys)


def explicit_probs(q: torch.Tensor, keys_t: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                   spec: AttentionSpec, causal_start: int | None = None,
                   scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities of :func:`explicit_scores` (same arguments), and what each row saw."""
    scores, visible = explicit_scores(q, keys_t, q_pos, k_pos, spec, causal_start, scratch)
    return torch.softmax(scores, dim=-1), visible


def explicit_log_probs(q: torch.Tensor, keys_t: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                       spec: AttentionSpec, causal_start: int | None = None, lse: torch.Tensor | None = None,
                       scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of :func:`explicit_scores` (same arguments), and what each row saw.
    ``lse`` [B, Hq, Q]: the rows' log-sum-exp as SDPA computed it over the same keys; it is
    subtracted from the scores in place (no softmax pass, no second tensor of their size).

    A prompt's first query sees its own key alone: probability 1, its log exactly 0, which
    CORM's test a >= alpha/t meets with equality at t = 1. SDPA's log-sum-exp comes from
    another kernel's product than these scores, a rounding apart, so that row is set exactly
    (every other row's threshold is a tie only by accident)."""
    scores, visible = explicit_scores(q, keys_t, q_pos, k_pos, spec, causal_start, scratch)
    if lse is None:  # in place: the scores are this call's own (scratch or a fresh upcast)
        return torch.log_softmax(scores, dim=-1, out=scores), visible
    b, hkv, g, nq, _ = scores.shape
    scores.sub_(lse.view(b, hkv, g, nq, 1))
    if causal_start == 0:
        scores[..., 0, 0] = 0.0
    return scores, visible


class QueryGroup(Protocol):
    """A KV head whose query heads are split over processes (tensor parallelism): each holds
    the same cache for it and sees its own heads' attention only."""

    def combine(self, probs: torch.Tensor, reduce: str | None) -> torch.Tensor:
        """This process's share ``probs`` [..., g, Q, S] -> what the policy reads for the whole
        group: reduced by ``reduce`` ([..., 1, Q, S]) or, for None, gathered ([..., G, Q, S])."""

    def agree(self, x: torch.Tensor) -> torch.Tensor:
        """One replica's ``x`` on all of them (state computed from each replica's own keys)."""


class RaggedCache(KVCache):
    # decode steps of a cache that evicts store each stream's key in a hole of its own blocks
    # (False: in its tail block, as a cache that never evicts does; tests compare the two)
    reuse_holes = True

    def __init__(self, policy: EvictionPolicy, *, block_size: int = 16, prefill_chunk: int | None = None,
                 query_group: QueryGroup | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.policy = policy
        self._policy_evicts = policy.can_evict()
        self.query_group = query_group
        self.block_size = block_size
        self.prefill_chunk = prefill_chunk
        streams = self.batch_size * self.num_kv_heads
        # every layer's per-slot bookkeeping in shared tensors: the all-layers pass reads it in place
        self.index = SlotIndex(self.num_layers, block_size, policy.state_fields(), self.device)
        self.pools = [BlockPool(streams, block_size, self.head_dim, self.dtype, self.device, policy.state_fields(),
                                self.index, layer) for layer in range(self.num_layers)]
        self._decode_steps = 0
        self._window: int | None = None  # the layers' sliding window (None: none)
        self._uniform = True  # host: every row has seen as many tokens (batch 1, unpadded batches)
        self._single = False  # this step appends exactly one token per row (decode)
        # an eager decode step's layers wrote their probabilities (and attended counts) into the
        # index's scratch, for the state update in end_step
        self._observed = False
        # live keys per layer after a compiled decode step evicted layer by layer; -1: no such step
        self._graph_live = torch.full((self.num_layers,), -1, dtype=torch.long, device=self.device)
        # a multi-token step's explicit scores, shared by its layers' chunks of rows and freed
        # after the step: a fresh tensor of several MiB per chunk is fresh pages to fault in
        self._scores: torch.Tensor | None = None
        self._step_counts: torch.Tensor | None = None  # host, per row: valid tokens of this call
        self._seen_before = 0
        self._set_stream_t()
        self._stream_pos = self._stream_t32  # decode: [S] 0-indexed position of each stream's new token

    def begin_step(self, valid: torch.Tensor | None, num_tokens: int) -> tuple[torch.Tensor, int]:
        self._seen_before = self.max_length
        self._observed = False
        self.index.end_scratch()  # a step that raised may have left some
        self._step_counts = None if valid is None else valid.sum(dim=1).cpu()
        if self._step_counts is not None and self.batch_size:
            self._uniform = self._uniform and bool((self._step_counts == self._step_counts[0]).all())
        positions, max_position = super().begin_step(valid, num_tokens)
        self._set_stream_t()  # once per step, not per layer
        self._single = num_tokens == 1 and valid is None
        if self._single:  # decode: every stream gets room for its token now, so attend() allocates nothing
            # [S]: each stream's new position, as the pool stores positions (once per step, not per layer)
            self._stream_pos = positions.repeat_interleave(self.num_kv_heads).to(torch.int32)
            if self._reuses_holes():
                self._choose_slots()
            else:
                for pool in self.pools:
                    pool.make_tail_room()
        else:  # every layer's pool grows by the same tokens: their bookkeeping regions are laid out once
            counts = self._stream_counts()
            counts = torch.full((self.batch_size * self.num_kv_heads,), num_tokens) if counts is None else counts
            self.index.reserve([pool.capacity_after(counts) for pool in self.pools])
        return positions, max_position

    def _reuses_holes(self) -> bool:
        return self.reuse_holes and (self._policy_evicts or self._window is not None)

    def _choose_slots(self) -> None:
        """Each stream's slot for this decode step in every layer: the lowest free slot of its
        own blocks (holes its evictions left, or its tail's room), else a fresh block's first.
        Under eviction a pool then takes blocks only as its streams outgrow their holes, and
        holes stop piling up until a repack (what CORM paid for on most steps: a round of tail
        blocks per pool every block of steps, most of them growing the pool, and repacks)."""
        slots, short, takers = self._free_slots_and_takers()
        for layer, streams in takers:
            first = self.pools[layer].give_blocks(streams) * self.block_size
            slots[layer, streams] = torch.where(short[layer, streams], first, slots[layer, streams])
        self.index.make_fresh(slots)  # (the index may have moved as pools grew: after them)
        for pool, chosen in zip(self.pools, slots.unbind(0)):
            pool.fill_slots(chosen)

    def _free_slots_and_takers(self) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """Every stream's lowest free slot [layers, S] (-1: none), whether it has none, and the
        streams that take a fresh block this step, per layer that has a stream with none."""
        slots, free = self.index.free_slots(self.batch_size * self.num_kv_heads)
        short = slots < 0
        if not bool(short.any()):
            return slots, short, []
        soon = free < max(1, int(EARLY_BLOCK_SHARE * self.block_size))  # (the short ones included)
        return slots, short, [(layer, soon[layer].nonzero()[:, 0]) for layer in short.any(dim=1).nonzero()[:, 0].tolist()]

    def _stream_counts(self) -> torch.Tensor | None:
        if self._step_counts is None:
            return None
        return self._step_counts.repeat_interleave(self.num_kv_heads)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, spec: AttentionSpec, out_rows: int | None = None) -> torch.Tensor:
        """Store and attend; the policy's state is updated here (prompts, compiled decode) or,
        in an eager decode step, for all layers at once in end_step, which also evicts. A decode
        step (one token per row, no padding) runs tensor operations only, no host sync: it can
        be compiled whole."""
        b, hq, t, d = q.shape
        hkv, g = self.num_kv_heads, spec.group_size
        pool = self.pools[layer]
        new_keys = k.reshape(b * hkv, t, d)
        if self._single:  # ``positions`` are the ones begin_step made: their per-stream copy is at hand
            slots = pool.append_one(new_keys[:, 0], v.reshape(b * hkv, d), self._stream_pos)
            for name, value in self._stored(new_keys[:, 0]).items():
                pool.state[name].view(-1).index_copy_(0, slots, value.to(pool.state[name].dtype))
            queries = q.reshape(b * hkv, g, d)
            if self._state_per_layer():
                block_t = self._block_t(pool.owner)
                out, state = decode_layer_step(pool.keys, pool.values, pool.positions, pool.owner, pool.state,
                                               queries, self._stream_pos, block_t, self._stream_t,
                                               spec, self.policy, self.query_group)
                held = pool.positions >= 0
                for name, value in state.items():  # empty slots keep their (fresh) state, as in _evict_all
                    if value is not pool.state[name]:
                        pool.state[name].copy_(torch.where(held, value, pool.state[name]))
                # this layer's evictions in the graph, and its live keys for end_step's compaction check
                view = SlotView(pool.positions, pool.state, block_t, pool.owner, self._stream_t, single_step=True)
                if self._evict(view, spec.sliding_window):
                    self._graph_live[layer] = (pool.positions >= 0).sum()
            else:  # eagerly, one update of every layer's state after the step (end_step) costs less
                out = self._observe_layer(layer, pool, queries, spec)
            out = out.view(b, hq, 1, d)
        elif self._seen_before == 0 and (self._policy_evicts or spec.sliding_window is not None):
            out = self._prompt_survivors(pool, q, k, v, positions, spec, out_rows)
        else:
            stream_pos = positions[:, None, :].expand(b, hkv, t).reshape(b * hkv, t)
            slots = pool.append(new_keys, v.reshape(b * hkv, t, d), stream_pos, self._stream_counts())
            for name, value in self._stored(new_keys).items():
                stored = slots >= 0
                pool.state[name].view(-1)[slots[stored]] = value[stored].to(pool.state[name].dtype)
            out = self._attend_pool(pool, q, k, v, positions, slots, spec, out_rows)
        if layer == 0:
            self._window = spec.sliding_window
        elif spec.sliding_window != self._window:
            raise NotImplementedError("the ragged cache evicts every layer with one sliding window; "
                                      f"layer {layer} has {spec.sliding_window}, layer 0 {self._window}")
        return out

    @staticmethod
    def _state_per_layer() -> bool:
        """Whether a decode step updates each layer's policy state and evicts with its
        attention: inside a compiled graph, which fuses them; eagerly, end_step updates and
        evicts every layer at once (a few operations in all instead of a few per layer)."""
        return torch.compiler.is_compiling()

    def _evict(self, view: SlotView, window: int | None) -> bool:
        """Empty the slots the policy drops and those a sliding ``window`` has left behind, in
        ``view.positions`` (one layer's pool, or every layer's laid end to end); returns whether
        anything could have been dropped. Tensor operations only."""
        drop = self.policy.evict(view) if self._policy_evicts else None
        if window is not None:
            # no future query (position >= t) can see a key at position <= t - window
            behind = (view.positions >= 0) & (view.positions <= view.query_t - window)
            drop = behind if drop is None else drop | behind
        if drop is None:
            return False
        view.positions.masked_fill_(drop, -1)
        return True

    def _stored(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """The policy's state of fresh keys; for a replicated KV head, the same on every replica
        (each computed its keys itself, possibly with another kernel: a last-bit difference
        must not make their caches part ways)."""
        stored = self.policy.stored(keys)
        if self.query_group is None or not stored:
            return stored
        return {name: self.query_group.agree(value) for name, value in stored.items()}

    def _block_t(self, owner: torch.Tensor | None, layers: int = 1) -> torch.Tensor:
        """[NB, 1]: the 1-indexed position of the latest query of the stream owning each block
        (``owner`` numbers the streams of ``layers`` layers one after the other), int32 as the
        pool's positions (comparing them with a long would copy them each time); [1, 1] when
        every stream has seen as many tokens (no lookup; ``owner`` may then be None)."""
        if self._uniform:
            return self._stream_t32[:1, None]
        stream_t = self._stream_t32 if layers == 1 else self._stream_t32.repeat(layers)
        return stream_t[owner.clamp(min=0)][:, None]

    def end_step(self) -> None:
        """After the last layer: evictions in every layer, host bookkeeping, and compaction of
        pools that holes or free blocks bloat."""
        self._scores = None
        if self._single:
            for pool in self.pools:
                pool.appended_one()
        self._decode_steps = self._decode_steps + 1 if self._single else 0
        observed, self._observed = self._observed, False
        live = None
        if observed or self._policy_evicts or self._window is not None:
            # an eager step that observed nothing may still have been a compiled graph, which
            # evicted layer by layer and counted (an observing eager step is no graph: no read)
            counted = None if observed else self._graph_live.tolist()
            if counted is not None and counted[0] >= 0:
                self._graph_live.fill_(-1)
                live = counted
            else:
                live = self._evict_all(observed)
        if not self._decode_steps or self._decode_steps % COMPACT_CHECK_EVERY == 0:
            for pool in self.pools:
                pool.release_empty_blocks()
        if live is None:  # nothing can have left: no new hole to check for
            return
        # every step that evicted: held bytes stay within COMPACT_SLACK of the live keys at
        # every step, not only at periodic checks (an eviction wave after a prompt can empty
        # several percent of the slots per step)
        for pool, kept in zip(self.pools, live):
            bs, streams = pool.block_size, pool.num_streams
            slack = pool.capacity * bs > COMPACT_SLACK * kept
            # and repacking would shrink it (a repacked pool holds at most this many blocks: a
            # tail block and at most one of aligning empty slots beyond the keys, per stream)
            if slack and pool.capacity > pool.bucket(-(-kept // bs) + 3 * streams):
                pool.compact()

    def _observe_layer(self, layer: int, pool: BlockPool, queries: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        """An eager decode step's attention in ``layer``; what the policy reads of it goes to
        this layer's rows of the index's scratch (the kernel writes it there itself), for
        end_step's update of every layer at once."""
        index = self.index
        probs_out = None
        if self.policy.needs_probs and self.query_group is None:  # (combined across ranks: a tensor of its own)
            group = 1 if self.policy.group_reduce else spec.group_size
            probs_out = index.scratch_rows("probs", layer, (group, 1, pool.block_size), torch.float32)
        out, probs, attended = decode_layer_observation(pool.keys, pool.values, pool.positions, pool.owner, queries,
                                                        self._stream_pos, self._stream_t, spec, self.policy,
                                                        self.query_group, probs_out)
        if probs is not None:
            self._observed = True
            if probs_out is None:
                probs_out = index.scratch_rows("probs", layer, probs.shape[1:], probs.dtype)
            if probs.data_ptr() != probs_out.data_ptr():
                probs_out.copy_(probs)
            if attended is not None:
                index.scratch_rows("attended", layer, (1,), attended.dtype).copy_(attended)
        return out

    def _evict_all(self, observed: bool) -> list[int]:
        """Update the policy's state from an eager decode step's observation (``observed``: the
        layers' probabilities are in the index's scratch), then evict from every layer, in one
        pass over the index (the policy sees all pools as one, each layer's streams numbered
        after the previous layer's; spare rows are free blocks); returns each layer's live keys
        (one sync).

        Per slot, the update and eviction are the same whether they run per layer or over
        all layers laid end to end: one pass costs a few operations instead of a few per layer."""
        index = self.index
        positions, layer_of_row = index.positions, index.region_of_row
        streams = self.batch_size * self.num_kv_heads

        def streams_numbered() -> torch.Tensor:  # each block's stream, numbered across the layers
            return torch.where(index.owner >= 0, index.owner + layer_of_row * streams, -1)

        owner = None if self._uniform else streams_numbered()  # (one t for every block: no lookup)
        query_t = self._block_t(owner, self.num_layers)
        state = index.state if observed or self._policy_evicts else {}
        scratch = index.end_scratch()
        if observed:
            live = self.policy.native_decode_step(state, scratch["probs"], positions, query_t, layer_of_row,
                                                  self.num_layers, self._window)
            if live is not None:
                return live
        owner = streams_numbered() if owner is None else owner
        stream_t = self._stream_t.repeat(self.num_layers)
        if observed:
            updated = self.policy.decode_update(state, scratch["probs"], query_t, scratch.get("attended"))
            held = positions >= 0
            for name, value in updated.items():
                # an empty slot keeps its state: fresh until a key is stored in it (see BlockPool._take_free)
                torch.where(held, value, state[name], out=state[name])
        self._evict(SlotView(positions, state, query_t, owner, stream_t, single_step=self._single), self._window)
        live = torch.zeros(self.num_layers, dtype=torch.long, device=self.device)
        return live.index_add_(0, layer_of_row, (positions >= 0).sum(dim=1)).tolist()

    def _prompt_survivors(self, pool: BlockPool, q, k, v, positions, spec, out_rows: int | None) -> torch.Tensor:
        """A multi-token call into an empty cache under a policy (or window) that evicts: the
        output and the policy's state over the call's own keys, then this step's evictions,
        and only the keys that survive them are stored, each stream's tail aligned as a repack
        would leave it. The same keys, positions and state as storing every key, evicting
        after the step and repacking, without writing and then moving the dropped keys."""
        b, hq, t, d = q.shape
        hkv, streams = self.num_kv_heads, self.batch_size * self.num_kv_heads
        new_keys = k.reshape(streams, t, d)
        state = {name: torch.full((b, hkv, t), fresh, dtype=dtype, device=self.device)
                 for name, (dtype, fresh) in pool.state_fields.items()}
        for name, value in self._stored(new_keys).items():
            state[name].copy_(value.view(b, hkv, t))
        out = self._attend_many(q, k, v, positions, positions, spec, out_rows, state)
        # this step's evictions over the call's keys, one row per stream as if it were a block
        key_pos = positions.to(torch.int32)[:, None, :].expand(b, hkv, t).reshape(streams, t).clone()
        state = {name: value.view(streams, t) for name, value in state.items()}
        owner = torch.arange(streams, device=self.device)
        self._evict(SlotView(key_pos, state, self._block_t(owner), owner, self._stream_t), spec.sliding_window)
        counts = (key_pos >= 0).sum(dim=1).cpu()
        slots = pool.append(new_keys, v.reshape(streams, t, d), key_pos, counts, aligned_lead(counts, pool.block_size)[0],
                            spare=streams)
        stored = slots >= 0
        flat = slots[stored]
        for name, value in state.items():
            pool.state[name].view(-1)[flat] = value[stored]
        return out

    def _attend_many(self, q, keys, values, positions, key_pos, spec, out_rows: int | None,
                     state: dict[str, torch.Tensor]) -> torch.Tensor:
        """A multi-token call's attention over ``keys``/``values`` [B, Hkv, S, D] at ``key_pos``:
        SDPA (or, for a whole prompt, cormlm's prompt kernel where it measures faster) for the
        output (of the last ``out_rows`` rows alone when given); explicit scores for the rows
        the policy reads, its observations merged into ``state`` ([B, Hkv, S] per field, in
        place).

        (Taking the scored rows' outputs from those scores instead of SDPA saved a few percent
        of a prompt, but rounded them otherwise than SDPA: tensor-parallel ranks, whose
        layers sum their heads' shares, then kept other keys than one process at a tie.)"""
        t = q.shape[2]
        # a whole unpadded prompt, nothing before: a causal kernel and a causal score mask
        fresh = self._seen_before == 0 and self._step_counts is None
        rows = self.policy.query_rows(t) if self.policy.needs_probs else 0
        if out_rows is not None:
            out = attend(q[:, :, -out_rows:], keys, values, spec, positions[:, -out_rows:], key_pos)
        elif fresh and rows and self.policy.reads_log_probs():
            return self._attend_scored_prompt(q, keys, values, positions, spec, rows, state)
        elif fresh:
            out = attend(q, keys, values, spec, causal=True)
        else:
            out = attend(q, keys, values, spec, positions, key_pos)
        if rows:
            self._observe_rows(q, keys, positions, key_pos, spec, rows, state, fresh)
        return out

    def _attend_scored_prompt(self, q, keys, values, positions, spec, rows: int,
                              state: dict[str, torch.Tensor]) -> torch.Tensor:
        """A whole prompt under a policy that reads log-probabilities: cormlm's prompt kernel
        hands over the scored rows' log-probabilities from its own pass, or SDPA gives each
        row's log-sum-exp and the rows are scored again (the rows' scores minus it); whichever
        measures faster with the policy's work included (:func:`prompt_attention.choose`). A
        prompt whose scored rows would take more than ``SCORED_BYTES`` at once is scored in
        chunks after either kernel's attention."""
        b, hq, t, _ = q.shape
        # the scored rows' log-probabilities, taken whole: each head's, or the group's maximum
        # where that is what the policy reads
        group_max = self.policy.group_reduce == "max"
        size = b * (self.num_kv_heads if group_max else hq) * rows * t

        def sdpa() -> torch.Tensor:
            out, lse = sdpa_causal_with_lse(q, keys, values, spec)
            self._observe_rows(q, keys, positions, positions, spec, rows, state, True, lse)
            return out

        def native() -> torch.Tensor:
            out, log_probs = prompt_attention.run_scored(q, keys, values, spec.scale, rows, group_max,
                                                         self._score_scratch(size))
            self._observe_rows(q, keys, positions, positions, spec, rows, state, True, log_probs=log_probs)
            return out

        plain = spec.sliding_window is None and spec.alibi_slopes is None
        if plain and size * 4 <= SCORED_BYTES:
            asked = f"{rows} rows' log-probabilities{', group maxima' * group_max}"
            return prompt_attention.choose(q, keys, values, asked, native, sdpa)
        out, lse = attend_causal_with_lse(q, keys, values, spec)
        self._observe_rows(q, keys, positions, positions, spec, rows, state, True, lse)
        return out

    def _score_scratch(self, size: int) -> torch.Tensor:
        """The step's float32 score scratch, at least ``size`` elements: shared by its layers
        (a fresh tensor per layer comes from fresh pages once it is large: a batch-8 prompt's
        scored rows faulted in about a gigabyte of pages over its 30 layers), freed with the step."""
        if self._scores is None or self._scores.numel() < size:
            self._scores = torch.empty(size, dtype=torch.float32, device=self.device)
        return self._scores

    def _observe_rows(self, q, keys, positions, key_pos, spec, rows: int, state: dict[str, torch.Tensor],
                      fresh: bool, lse: torch.Tensor | None = None, log_probs: torch.Tensor | None = None) -> None:
        """The policy observes the last ``rows`` query rows' attention over ``keys`` (at
        ``key_pos``), in chunks of rows, and its observations merge into ``state``: their
        probabilities (or log-probabilities, for a policy that reads them) from explicit
        scores, less ``lse`` where given, or the chunks of ``log_probs`` [B, Hkv, G, rows, S]
        where a kernel computed them."""
        b, hq, t, d = q.shape
        hkv = self.num_kv_heads
        logs = self.policy.reads_log_probs()
        chunk = score_rows(b * hq, keys.shape[-2])
        if log_probs is None:
            keys_t = keys.transpose(-1, -2).contiguous()
            # (other dtypes' products are upcast into a new tensor anyway)
            scratch = self._score_scratch(b * hq * min(chunk, rows) * keys.shape[-2]) \
                if keys.dtype == torch.float32 else None
        for start in range(t - rows, t, chunk):  # chunks of rows: never a full rows x keys matrix
            stop = min(start + chunk, t)
            q_pos = positions[:, start:stop]
            causal_start = start if fresh else None
            if log_probs is not None:
                probs = log_probs[:, :, :, start - (t - rows):stop - (t - rows)]
                visible = causal_visible(start, stop, keys.shape[-2], b, hkv, self.device)
            elif logs:
                probs, visible = explicit_log_probs(q[:, :, start:stop], keys_t, q_pos, key_pos, spec, causal_start,
                                                    None if lse is None else lse[:, :, start:stop], scratch)
            else:
                probs, visible = explicit_probs(q[:, :, start:stop], keys_t, q_pos, key_pos, spec, causal_start,
                                                scratch)
            if self.query_group is not None:
                probs = self.query_group.combine(probs, self.policy.group_reduce)
            query_t = (q_pos + 1).clamp(min=0)[:, None, :].expand(b, hkv, stop - start)
            attended = visible.sum(dim=-1) if self.policy.needs_attended else None
            observe = self.policy.observe_log if logs else self.policy.observe
            observed = observe(probs, query_t, attended, visible)
            for name, value in self.policy.merge(state, observed).items():
                state[name].copy_(value)

    def _attend_pool(self, pool: BlockPool, q, k, v, positions, slots, spec, out_rows: int | None) -> torch.Tensor:
        """A multi-token call after the new keys were stored in ``slots``: attention over the
        call's own keys (nothing cached before) or every key the pool holds, the policy's
        state of the attended keys read from the pool and written back once."""
        b, hq, t, d = q.shape
        hkv = self.num_kv_heads
        if self._seen_before == 0:  # nothing cached before: attend over the new tokens as they are
            keys, values, key_pos, key_slots = k, v, positions, slots.view(b, hkv, t)
        else:
            keys, values, key_pos, key_slots = pool.gather_dense()
            length = keys.shape[1]
            keys, values = keys.view(b, hkv, length, d), values.view(b, hkv, length, d)
            key_pos, key_slots = key_pos.view(b, hkv, length), key_slots.view(b, hkv, length)
        scored = self.policy.needs_probs and self.policy.query_rows(t) > 0
        # the attended keys' state laid out as the keys are ([B, Hkv, S]; padding reads slot 0
        # and is never written back)
        state = {name: value.view(-1)[key_slots.clamp(min=0)] for name, value in pool.state.items()} if scored else {}
        out = self._attend_many(q, keys, values, positions, key_pos, spec, out_rows, state)
        held = key_slots >= 0
        flat = key_slots[held]
        for name, value in state.items():
            pool.state[name].view(-1)[flat] = value[held]
        return out

    # ------------------------------------------------- rows joining and leaving (serving)
    @torch.inference_mode()
    def remove_rows(self, rows: list[int]) -> None:
        """Free ``rows`` (their blocks go back to each pool's free list) and renumber the rest
        in order. The other rows' keys stay where they are: nothing is copied."""
        keep = torch.ones(self.batch_size, dtype=torch.bool)
        keep[list(rows)] = False
        streams = keep.repeat_interleave(self.num_kv_heads)
        for pool in self.pools:
            pool.remove_streams(streams)
        self.lengths = self.lengths[keep.to(self.device)]
        self._set_batch_size()

    @torch.inference_mode()
    def append_rows(self, other: RaggedCache) -> None:
        """Add ``other``'s rows after this cache's own (a request prefilled alone joining a
        running batch): only ``other``'s blocks are copied. Both caches must come from the same
        model and CacheConfig."""
        same = (other.num_layers, other.num_kv_heads, other.head_dim, other.dtype, other.device, other.block_size)
        if same != (self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device, self.block_size) \
                or type(other.policy) is not type(self.policy) or vars(other.policy) != vars(self.policy):
            raise ValueError("append_rows needs a cache of the same model, policy and block size")
        for pool, theirs in zip(self.pools, other.pools):
            pool.append_streams(theirs)
        self.lengths = torch.cat([self.lengths, other.lengths])
        self._set_batch_size()

    def _set_batch_size(self) -> None:
        self.batch_size = len(self.lengths)
        self.max_length = int(self.lengths.max()) if self.batch_size else 0
        self._uniform = not self.batch_size or bool((self.lengths == self.lengths[0]).all())
        self._set_stream_t()

    def _set_stream_t(self) -> None:
        """Each stream's query count [S] (long), and as int32 for comparisons with positions."""
        self._stream_t = self.lengths.repeat_interleave(self.num_kv_heads)
        self._stream_t32 = self._stream_t.to(torch.int32)

    def release_empty_blocks(self) -> None:
        """Return blocks that evictions emptied to the free lists now (decoding does it every
        ``COMPACT_CHECK_EVERY`` steps): what a memory budget reads right after is current."""
        for pool in self.pools:
            pool.release_empty_blocks()

    def bytes_in_use(self) -> int:
        """Bytes of the blocks that rows own, in every layer (one host sync): the pools' spare
        capacity and free blocks excluded."""
        used = torch.stack([(pool.owner >= 0).sum() for pool in self.pools]).tolist()
        return sum(n * pool.block_nbytes() for n, pool in zip(used, self.pools))

    def retained_fraction(self) -> float:
        """Keys held over keys seen, every layer, row and KV head: ``stats().retained_fraction``
        without per-stream lists (one host sync; the server reads it every step)."""
        kept = torch.stack([((pool.positions >= 0) & (pool.owner[:, None] >= 0)).sum() for pool in self.pools]).sum()
        seen = int(self.lengths.sum()) * self.num_layers * self.num_kv_heads
        return int(kept) / seen if seen else 1.0

    def bytes_for_next_token(self) -> int:
        """Bytes of the fresh blocks the next decode step takes (streams with no room in their
        tail block; where decode steps fill holes, see _choose_slots)."""
        if self._reuses_holes():
            _, _, takers = self._free_slots_and_takers()
            return sum(len(streams) * self.pools[layer].block_nbytes() for layer, streams in takers)
        return sum(pool.blocks_for_next_token() * pool.block_nbytes() for pool in self.pools)

    def storage_tensors(self) -> list[torch.Tensor]:
        return [tensor for pool in self.pools for tensor in pool.storage_tensors()] + self.index.storage_tensors()

    def positions(self, layer: int) -> list[list[torch.Tensor]]:
        per_stream = self.pools[layer].stream_positions()
        hkv = self.num_kv_heads
        return [per_stream[row * hkv:(row + 1) * hkv] for row in range(self.batch_size)]

    def stats(self) -> CacheStats:
        hkv = self.num_kv_heads
        retained = []
        for pool in self.pools:
            counts = pool.live_counts().tolist()
            retained.append([counts[row * hkv:(row + 1) * hkv] for row in range(self.batch_size)])
        held = sum(t.untyped_storage().nbytes() for t in self.storage_tensors())
        return CacheStats(retained, held, self.bytes_full(), [int(n) for n in self.lengths])
