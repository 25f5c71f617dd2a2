"""Paged storage of one layer's keys and values, ragged per (batch row, KV head).

Why a paged pool rather than compacted dense [B, Hkv, capacity, D] storage: under CORM
heads keep very different numbers of keys, and a dense layout pays for the longest head
in every head. Here each (row, KV head) *stream* owns its own blocks of ``block_size``
slots taken from one pool per layer, so bytes follow the sum of what the streams retain
(block granularity aside).

- Appending writes only the new tokens into each stream's tail block (or into a fresh
  block taken from the free list): never a copy of the cache. A decode step of a cache that
  evicts writes each stream's token into a slot the cache chose instead (``fill_slots``): the
  lowest free one of the stream's own blocks, a hole an eviction left where there is one.
- Eviction marks slots empty; blocks whose slots are all empty go back to the free list at
  the cache's periodic check or when the pool would otherwise grow. Holes inside live
  blocks are filled by those decode steps, or reclaimed by ``compact``, which repacks the
  live slots stream by stream and resizes the pool to fit: the cache calls it when holes or
  free blocks make up a large share of the pool, so held bytes track retained tokens and
  the memory really goes back to the allocator.
- Keys are stored transposed within each block ([blocks, head_dim, block], values
  [blocks, block, head_dim]): decode attention multiplies each block's queries by its keys
  as a contiguous [head_dim, block] matrix (a batched product with a transposed operand
  runs about half as fast on CPU BLAS). ``key_slots`` is the [blocks, block, head_dim] view.
- Positions, not slots, define attention (see ``attention_ops``), so slot order within a
  stream never matters and no reordering is needed on eviction.
- Fixed-capacity tensors addressed by index tensors: a decode step has static shapes
  between pool resizes, and pool sizes come from a small set of buckets, so
  ``torch.compile`` sees few distinct shapes. The host tracks fill pointers and an upper
  bound of allocated blocks, so a decode step needs no device-to-host sync.
"""

from __future__ import annotations

import math

import torch

from .. import huge_pages
from . import paged_kernel
from .slot_index import SlotIndex

MIN_POOL_SLOTS = 128  # the smallest pool, in slots (so larger blocks do not raise a short cache's floor)


def bucket(n: int, smallest: int = 8) -> int:
    """Round a block count up to one of few sizes (1/32-octave steps, <= 3.2% slack), at least
    ``smallest``: a growing pool is reallocated (and copied) once per 3% of growth, not per block."""
    if n <= smallest:
        return smallest
    step = 2 ** max(0, (n - 1).bit_length() - 6)
    return math.ceil(n / step) * step


def aligned_lead(counts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty slots to leave before each stream's keys [S] when repacking ``counts`` [S] live
    keys (host) so that every stream with keys ends on a tail block holding the same number
    of them, and that number (the one that leaves the fewest empty slots).

    Why: a stream takes a fresh tail block when its tail fills; repacked streams whose tails
    hold different counts fill on different decode steps, and each such step costs a round of
    small operations per layer. Aligned, a pool's streams take their blocks together: one
    round per ``block_size`` steps. The price is under a block per stream, until the next
    repack. (Decode steps of an evicting cache fill holes instead, see
    ``RaggedCache.reuse_holes``: there the lead slots are the first holes they fill.)"""
    fills = torch.arange(1, block_size + 1)[:, None]  # every possible common tail fill
    leads = (fills - counts[None, :]) % block_size  # [fills, S]
    live = counts > 0
    best = int((leads * live).sum(dim=1).argmin())
    return torch.where(live, leads[best], 0), best + 1


def stream_live_counts(positions: torch.Tensor, owner: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Live keys per stream [S] (long) from a pool's ``positions`` [NB, block] and ``owner`` [NB].

    No boolean indexing: shapes stay static, so it runs without a sync and compiles.
    """
    live = torch.where(owner >= 0, (positions >= 0).sum(dim=1), 0)
    out = torch.zeros(num_streams, dtype=torch.long, device=positions.device)
    return out.index_add_(0, owner.clamp(min=0), live)


# what torch._dynamo.maybe_mark_dynamic sets on a tensor (torch 2.13)
DIM_MARKS = ("_dynamo_weak_dynamic_indices", "_has_dynamo_dim_marking")


class BlockPool:
    """One layer's pool. Its keys and values are its own tensors; its per-slot bookkeeping
    (``positions``, ``owner``, ``state``) is a region of a :class:`SlotIndex` shared by all the
    cache's layers (one of its own when none is given)."""

    def __init__(self, num_streams: int, block_size: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, state_fields: dict[str, tuple[torch.dtype, float]],
                 index: SlotIndex | None = None, region: int = 0) -> None:
        self.dynamic_marks = True  # see set_dynamic_marks
        self.num_streams = num_streams
        self.block_size = block_size
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.state_fields = state_fields
        self.index = SlotIndex(1, block_size, state_fields, device) if index is None else index
        self.region = region
        self.index.attach(region, self)
        self._allocate(0)
        self.tail = torch.full((num_streams,), -1, dtype=torch.long, device=device)
        # Host mirror of each tail block's fill; block_size means "no room, take a new block".
        self.fill = torch.full((num_streams,), block_size, dtype=torch.long)
        self._room_left = 0  # host: free slots in the fullest tail block (min over streams)
        self.allocated_upper = 0  # host upper bound of blocks owned by streams
        # [S]: the slot each stream's token of this decode step goes to, when the cache chose
        # them (free slots of the stream's own blocks, see ``SlotIndex.free_slots``); None: the tails
        self.next_slot: torch.Tensor | None = None
        self._tails_forgotten = False  # host: fill_slots set every tail to none since a tail was taken

    # ----------------------------------------------------------------- storage
    def _allocate(self, num_blocks: int) -> None:
        """Fresh storage for ``num_blocks`` free blocks (the bookkeeping region reset)."""
        bs, d, dev = self.block_size, self.head_dim, self.device
        # on huge pages where the host has them (cormlm.huge_pages): a decode step streams them
        self.keys = huge_pages.empty(num_blocks, d, bs, dtype=self.dtype, device=dev).zero_()  # transposed per block
        self.values = huge_pages.empty(num_blocks, bs, d, dtype=self.dtype, device=dev).zero_()
        self._mark_dynamic(self.keys, self.values)
        self.index.resize(self.region, num_blocks, keep=False)

    def bind(self) -> None:
        """Take this pool's bookkeeping views from the index (after it moved or resized them)."""
        self.positions, self.owner, self.state = self.index.views(self.region)
        self._mark_dynamic(self.positions, self.owner, *self.state.values())

    def _mark_dynamic(self, *tensors: torch.Tensor) -> None:
        """Compiled steps: the block count is symbolic (no recompilation as the pool resizes)."""
        if self.dynamic_marks:
            for tensor in tensors:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)

    def set_dynamic_marks(self, on: bool) -> None:
        """Mark (the default) or unmark this pool's tensors, now and as they are replaced. A
        decode step loaded from disk (``cormlm.compile_cache``) wants unmarked tensors: its
        guards, rebuilt from the saved state, refuse marks (its block counts are symbolic anyway)."""
        self.dynamic_marks = on
        tensors = (self.keys, self.values, self.positions, self.owner, *self.state.values())
        if on:
            self._mark_dynamic(*tensors)
            return
        for tensor in tensors:
            for name in DIM_MARKS:
                if hasattr(tensor, name):
                    delattr(tensor, name)

    def key_slots(self) -> torch.Tensor:
        """The keys as [blocks, block, head_dim] (a view of the transposed storage)."""
        return self.keys.transpose(1, 2)

    def _split_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat slot ids -> (block, index in block), to address ``key_slots``."""
        return slots // self.block_size, slots % self.block_size

    def bucket(self, blocks: int) -> int:
        """The pool size (in blocks) that holds ``blocks``: see :func:`bucket`."""
        return bucket(blocks, max(1, MIN_POOL_SLOTS // self.block_size))

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    def storage_tensors(self) -> list[torch.Tensor]:
        """The tensors this pool holds of its own (the index's are the index's to report)."""
        return [self.keys, self.values, self.tail]

    def _grow(self, needed_blocks: int) -> None:
        old_keys, old_values = self.keys, self.values
        n = self.capacity
        blocks = self.bucket(needed_blocks)
        # the old blocks copied, only the new ones zeroed (a step that grows pays one write per byte)
        self.keys = huge_pages.empty(blocks, *old_keys.shape[1:], dtype=self.dtype, device=self.device)
        self.values = huge_pages.empty(blocks, *old_values.shape[1:], dtype=self.dtype, device=self.device)
        self.keys[:n], self.values[:n] = old_keys, old_values
        self.keys[n:].zero_()
        self.values[n:].zero_()
        self._mark_dynamic(self.keys, self.values)
        self.index.resize(self.region, blocks, keep=True)

    def _reserve(self, new_blocks: int) -> None:
        """Make sure ``new_blocks`` free blocks exist (syncs only when the bound says maybe not)."""
        if self.allocated_upper + new_blocks <= self.capacity:
            return
        self.release_empty_blocks()
        self.allocated_upper = int((self.owner >= 0).sum())
        if self.allocated_upper + new_blocks > self.capacity:
            self._grow(self.allocated_upper + new_blocks)

    def _new_blocks(self, counts: torch.Tensor, lead: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For ``counts`` (host, [S]) new tokens per stream, after ``lead`` empty slots: each
        stream's room left in its tail block, slots taken past it, and fresh blocks those take."""
        room = self.block_size - self.fill
        extra = (counts - room).clamp(min=0) if lead is None else (counts + lead - room).clamp(min=0)
        return room, extra, (extra + self.block_size - 1) // self.block_size

    def capacity_after(self, counts: torch.Tensor) -> int:
        """The blocks this pool will have after appending ``counts`` (host, [S]) tokens per stream
        (an upper bound: a growth may first release empty blocks)."""
        total_new = int(self._new_blocks(counts)[2].sum())
        if self.allocated_upper + total_new <= self.capacity:
            return self.capacity
        return self.bucket(self.allocated_upper + total_new)

    def _take_free(self, count: int) -> torch.Tensor:
        """Indices of the first ``count`` free blocks, their policy state made fresh: a slot is
        always fresh until a key is stored in it, so appending a key writes no state (a released
        block still holds its evicted keys' state)."""
        ids = (self.owner < 0).nonzero()[:count, 0]
        for name, (_, fresh) in self.state_fields.items():
            self.state[name].index_fill_(0, ids, fresh)
        return ids

    # ------------------------------------------------------------------ append
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               counts: torch.Tensor | None, lead: torch.Tensor | None = None, spare: int = 0) -> torch.Tensor:
        """Store new tokens; return their flat slot ids [S, T] (-1 for tokens not stored).

        ``keys``/``values`` are [S, T, D], ``positions`` [S, T] (-1: padding, or a key already
        evicted, never stored: the others are stored in order); ``counts`` (host, [S]) are the
        stored tokens per stream, None when all T are. ``lead`` (host, [S]): empty slots left
        before each stream's first key, for streams without a tail block (a pool filled in
        one call then has its streams' tails aligned as a repack leaves them, see
        :func:`aligned_lead`). ``spare``: free blocks to leave beyond this call's when the pool
        must grow for it (a repack leaves a block per stream: the next round of tail blocks).
        """
        s, t, _ = keys.shape
        bs = self.block_size
        dev = self.device
        counts_host = torch.full((s,), t, dtype=torch.long) if counts is None else counts
        room, extra, new_per_stream = self._new_blocks(counts_host, lead)
        if lead is not None and bool((room[lead > 0] > 0).any()):
            raise ValueError("append: a lead of empty slots is for streams without room in a tail block")
        total_new = int(new_per_stream.sum())
        new_ids = torch.empty(0, dtype=torch.long, device=dev)
        if total_new:
            self._reserve(total_new + spare)
            new_ids = self._take_free(total_new)
            streams = torch.arange(s, device=dev).repeat_interleave(new_per_stream.to(dev))
            self.owner[new_ids] = streams
            self.allocated_upper += total_new
        valid = None if counts is None else positions >= 0
        rank = (torch.arange(t, device=dev).expand(s, t) if valid is None
                else valid.long().cumsum(dim=1) - 1)
        room_d, fill_d = room.to(dev)[:, None], self.fill.to(dev)[:, None]
        in_tail = rank < room_d
        past = (rank - room_d if lead is None else rank + lead.to(dev)[:, None] - room_d).clamp(min=0)
        if total_new:
            first_new = (new_per_stream.cumsum(0) - new_per_stream).to(dev)[:, None]
            fresh_block = new_ids[(first_new + past // bs).clamp(max=total_new - 1)]
            block = torch.where(in_tail, self.tail[:, None], fresh_block)
        else:
            block = self.tail[:, None].expand(s, t)
        slots = block * bs + torch.where(in_tail, fill_d + rank, past % bs)
        if valid is not None:
            slots = slots.masked_fill(~valid, -1)
            src = valid.view(-1).nonzero().squeeze(1)  # the stored tokens, found once for all tensors
            write = slots.view(-1).index_select(0, src)
        else:
            write, src = slots.reshape(-1), None
        d = self.head_dim

        def flat(x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(-1, *x.shape[2:])
            return x if src is None else x.index_select(0, src)

        self.key_slots()[self._split_slots(write)] = flat(keys).to(self.dtype)
        self.values.view(-1, d)[write] = flat(values).to(self.dtype)
        self.positions.view(-1)[write] = flat(positions).to(torch.int32)
        if total_new:
            has_new = new_per_stream > 0
            last_new = (new_per_stream.cumsum(0) - 1).clamp(min=0).to(dev)
            self.tail = torch.where(has_new.to(dev), new_ids[last_new], self.tail)
            self._tails_forgotten = False
            self.fill = torch.where(has_new, extra - (new_per_stream - 1) * bs, self.fill + counts_host)
        else:
            self.fill = self.fill + counts_host
        self._room_left = bs - int(self.fill.max())
        return slots

    def tail_has_room(self) -> bool:
        """Whether every stream's tail block has a free slot (host bookkeeping, no sync)."""
        return self._room_left > 0

    def make_tail_room(self) -> None:
        """Give every stream whose tail block is full (or that has none) a fresh tail block,
        so that the next single-token append needs no allocation (decode, before the step)."""
        if self.tail_has_room():
            return
        full = self.fill >= self.block_size  # host
        streams = full.nonzero()[:, 0].to(self.device)
        self.tail = self.tail.index_copy(0, streams, self.give_blocks(streams))
        self._tails_forgotten = False
        self.fill = self.fill.masked_fill(full, 0)
        self._room_left = self.block_size - int(self.fill.max())

    def give_blocks(self, streams: torch.Tensor) -> torch.Tensor:
        """A fresh block for each of ``streams`` [n] (the pool grows if it must); returns their ids."""
        self._reserve(len(streams))
        ids = self._take_free(len(streams))
        self.owner[ids] = streams
        self.allocated_upper += len(streams)
        return ids

    def fill_slots(self, slots: torch.Tensor) -> None:
        """This decode step's tokens go to ``slots`` [S] (free slots of each stream's own blocks,
        their state fresh) rather than to the tails: the tails are forgotten (a later append of
        several tokens starts fresh blocks; these slots may be a tail's next ones)."""
        self.next_slot = slots
        if not self._tails_forgotten:
            self.tail = torch.full_like(self.tail, -1)
            self.fill = torch.full_like(self.fill, self.block_size)
            self._room_left = 0
            self._tails_forgotten = True

    def append_one(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per stream (``keys`` [S, D], ``positions`` [S]) into each tail block's next
        slot; returns the slots [S]. Tensor operations when traced, else one C call where it
        fits (``paged_kernel.append``): the caller made tail room before the step and calls
        :meth:`appended_one` after it; or the cache chose each stream's slot (:meth:`fill_slots`)."""
        chosen = self.next_slot
        # eagerly, every stream with its tail slot (so that C may write): one C call
        if not torch.compiler.is_compiling() and (chosen is not None or self._room_left > 0) \
                and self.device.type == "cpu":
            slots = paged_kernel.append(self.keys, self.values, self.positions, self.tail, self.fill, keys, values,
                                        positions, chosen)
            if slots is not None:
                return slots
        if chosen is None:
            block, within = self.tail, self.fill.to(self.device)
            slots = block * self.block_size + within
        else:
            slots = chosen
            block, within = self._split_slots(slots)
        d = self.head_dim
        self.key_slots().index_put_((block, within), keys.to(self.dtype))  # (block, index in block) as held
        self.values.view(-1, d).index_copy_(0, slots, values.to(self.dtype))
        self.positions.view(-1).index_copy_(0, slots, positions.to(torch.int32))
        return slots  # (the slots' state is fresh: see _take_free)

    def appended_one(self) -> None:
        """Host bookkeeping after :meth:`append_one`."""
        if self.next_slot is not None:  # the slots were chosen for this step only
            self.next_slot = None
            return
        self.fill = self.fill + 1
        self._room_left -= 1

    # ------------------------------------------------------------------- evict
    def evict(self, drop: torch.Tensor) -> None:
        """Empty the slots in ``drop`` [NB, block] (one masked write: cheap on every step)."""
        self.positions.masked_fill_(drop, -1)

    def release_empty_blocks(self) -> None:
        """Give blocks with no live slot (tail blocks excepted) back to the free list."""
        n = self.capacity
        empty = (self.positions < 0).all(dim=1) & (self.owner >= 0)
        is_tail = torch.zeros(n + 1, dtype=torch.bool, device=self.device)
        is_tail[torch.where(self.tail >= 0, self.tail, n)] = True  # streams without a tail hit the spare
        self.owner.masked_fill_(empty & ~is_tail[:n], -1)

    # ---------------------------------------------------------------- read out
    def _live_sorted(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat slot ids of live keys sorted by (stream, position), their streams, counts [S]."""
        flat_pos = self.positions.view(-1)
        slot = (flat_pos >= 0).nonzero()[:, 0]
        stream = self.owner[slot // self.block_size]
        order = torch.argsort(stream * (2**31) + flat_pos[slot].long())
        slot, stream = slot[order], stream[order]
        counts = torch.bincount(stream, minlength=self.num_streams)
        return slot, stream, counts

    def live_counts(self) -> torch.Tensor:
        return stream_live_counts(self.positions, self.owner, self.num_streams)

    def stream_positions(self) -> list[torch.Tensor]:
        slot, _, counts = self._live_sorted()
        pos = self.positions.view(-1)[slot].long()
        return list(pos.cpu().split(counts.tolist()))

    def gather_dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Live keys/values per stream, padded: [S, L, D] x2, positions [S, L] (-1 pad), slots [S, L]."""
        slot, stream, counts = self._live_sorted()
        length = int(counts.max()) if counts.numel() else 0
        starts = counts.cumsum(0) - counts
        rank = torch.arange(len(slot), device=self.device) - starts[stream]
        dense_slot = torch.full((self.num_streams, length), -1, dtype=torch.long, device=self.device)
        dense_slot[stream, rank] = slot
        safe = dense_slot.clamp(min=0)
        d = self.head_dim
        keys = self.key_slots()[self._split_slots(safe)]
        values = self.values.view(-1, d)[safe]
        positions = self.positions.view(-1)[safe].long().masked_fill(dense_slot < 0, -1)
        return keys, values, positions, dense_slot

    # ----------------------------------------------------------------- streams
    def block_nbytes(self) -> int:
        """Bytes one block costs in every tensor that has a row per block (keys, values,
        positions, owner, policy state): the unit of memory a server budgets in."""
        return sum(math.prod(t.shape[1:]) * t.element_size()
                   for t in (self.keys, self.values, self.positions, self.owner, *self.state.values()))

    def remove_streams(self, keep: torch.Tensor) -> None:
        """Free every block of the streams not in ``keep`` (host bool [S]) and renumber the
        kept streams 0.. in order; the kept streams' blocks stay where they are (no copy)."""
        mapping = torch.full((self.num_streams,), -1, dtype=torch.long)
        mapping[keep] = torch.arange(int(keep.sum()))
        owned = self.owner >= 0
        renumbered = torch.where(owned, mapping.to(self.device)[self.owner.clamp(min=0)], -1)
        self.positions.masked_fill_((owned & (renumbered < 0))[:, None], -1)  # free blocks hold no key
        self.owner.copy_(renumbered)
        self.tail = self.tail[keep.to(self.device)]
        self.fill = self.fill[keep]
        self.num_streams = len(self.fill)
        self._room_left = self.block_size - int(self.fill.max()) if self.num_streams else 0
        self.allocated_upper = self.used_blocks()

    def append_streams(self, other: BlockPool) -> None:
        """Take ``other``'s streams as new streams after this pool's own: only ``other``'s owned
        blocks are copied, into free blocks of this pool, in their order."""
        source = (other.owner >= 0).nonzero()[:, 0]
        count = len(source)
        self._reserve(count)
        target = self._take_free(count)
        self.keys[target], self.values[target] = other.keys[source], other.values[source]
        self.positions[target] = other.positions[source]
        for name, tensor in other.state.items():
            self.state[name][target] = tensor[source]
        self.owner[target] = other.owner[source] + self.num_streams
        moved = torch.full((other.capacity + 1,), -1, dtype=torch.long, device=self.device)
        moved[source] = target
        self.tail = torch.cat([self.tail, moved[other.tail.masked_fill(other.tail < 0, other.capacity)]])
        self._tails_forgotten = False
        self.fill = torch.cat([self.fill, other.fill])
        self.num_streams += other.num_streams
        self.allocated_upper += count
        self._room_left = self.block_size - int(self.fill.max())

    def blocks_for_next_token(self) -> int:
        """Blocks the next single-token append takes from the free list (host, no sync)."""
        return int((self.fill >= self.block_size).sum())

    # ----------------------------------------------------------------- compact
    def used_blocks(self) -> int:
        return int((self.owner >= 0).sum())

    def compact(self) -> None:
        """Repack live slots per stream into a pool sized to fit (holes reclaimed), every stream's
        tail block filled alike (see :func:`aligned_lead`)."""
        slot, stream, counts = self._live_sorted()
        bs = self.block_size
        counts_host = counts.cpu()
        lead_host, fill = aligned_lead(counts_host, bs)
        lead = lead_host.to(self.device)
        blocks_per_stream = (counts + lead + bs - 1) // bs
        total = int(blocks_per_stream.sum())
        first_block = blocks_per_stream.cumsum(0) - blocks_per_stream
        # each stream's keys after its ``lead`` empty slots
        rank = torch.arange(len(slot), device=self.device) - (counts.cumsum(0) - counts)[stream] + lead[stream]
        new_slot = (first_block[stream] + rank // bs) * bs + rank % bs
        old_keys, old_values = self.keys, self.values
        # the bookkeeping region is reset in place by _allocate: read the live slots' first
        live_positions = self.positions.view(-1)[slot]
        live_state = {name: tensor.view(-1)[slot] for name, tensor in self.state.items()}
        self._allocate(self.bucket(total + self.num_streams))
        d = self.head_dim
        self.key_slots()[self._split_slots(new_slot)] = old_keys.transpose(1, 2)[self._split_slots(slot)]
        self.values.view(-1, d)[new_slot] = old_values.view(-1, d)[slot]
        self.positions.view(-1)[new_slot] = live_positions
        for name, values in live_state.items():
            self.state[name].view(-1)[new_slot] = values
        streams = torch.arange(self.num_streams, device=self.device)
        self.owner[:total] = streams.repeat_interleave(blocks_per_stream)
        has = blocks_per_stream > 0
        self.tail = torch.where(has, first_block + blocks_per_stream - 1, torch.full_like(first_block, -1))
        self._tails_forgotten = False
        self.fill = torch.where(counts_host > 0, fill, bs)
        self._room_left = bs - int(self.fill.max())
        self.allocated_upper = total
