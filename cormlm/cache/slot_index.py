"""The per-slot bookkeeping of a cache's block pools, laid end to end in shared tensors.

An eager decode step updates the policy's state and evicts in every layer at once (one
pass, a few operations in all, instead of a few per layer). With each pool's positions,
owners and state in tensors of its own, that pass had to concatenate them and copy the
results back, every step. Here each pool's bookkeeping is one region of rows of shared
tensors (``positions`` [rows, block], ``owner`` [rows], one [rows, block] tensor per state
field), so the pass reads and writes them in place, and so does a step's scratch laid out
the same way (the probabilities each layer's attention writes for that pass).

A region keeps spare rows (``REGION_HEADROOM``), so a growing pool seldom moves the layout
(a move copies the bookkeeping only: ~2% of a block's bytes, keys and values stay in each
pool's own tensors, sized to the pool). Rows past a pool's blocks are free blocks (owner -1,
every position -1), which every pass ignores; their state and scratch rows may hold anything
(state is reset when the pool takes the row).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from . import paged_kernel

REGION_HEADROOM = 1.0625  # a region moved or made bigger gets this many times the rows asked for
REGION_SPARE_MAX = 1.25  # lay out again, each region with its headroom, when regions hold more rows than this times used


class BoundPool(Protocol):
    def bind(self) -> None:
        """Take the region's views again (the layout moved or the region changed size)."""


class SlotIndex:
    def __init__(self, regions: int, block_size: int, state_fields: dict[str, tuple[torch.dtype, float]],
                 device: torch.device) -> None:
        self.block_size = block_size
        self.state_fields = state_fields
        self.device = device
        self.sizes = [0] * regions  # rows each region's pool uses (its blocks)
        self.spans = [0] * regions  # rows each region has
        self.starts = [0] * regions
        self.wanted = [0] * regions  # rows a region was reserved for and has not yet taken (see reserve)
        self._pools: dict[int, BoundPool] = {}
        self.scratch: dict[str, torch.Tensor] = {}  # this step's, laid out as the index
        self._layout([0] * regions, keep=False)

    def attach(self, region: int, pool: BoundPool) -> None:
        """``pool`` keeps views of ``region``: it is told to take them again whenever they change."""
        self._pools[region] = pool
        pool.bind()

    # ------------------------------------------------------------------ layout
    def _layout(self, spans: list[int], keep: bool) -> None:
        """New shared tensors with ``spans`` rows per region; each region's used rows copied
        over (``keep``) and the rest free."""
        total, bs, dev = sum(spans), self.block_size, self.device
        positions = torch.full((total, bs), -1, dtype=torch.int32, device=dev)
        owner = torch.full((total,), -1, dtype=torch.long, device=dev)
        state = {name: torch.full((total, bs), fresh, dtype=dtype, device=dev)
                 for name, (dtype, fresh) in self.state_fields.items()}
        starts = [sum(spans[:i]) for i in range(len(spans))]
        if keep:
            for old_start, new_start, size in zip(self.starts, starts, self.sizes):
                old, new = slice(old_start, old_start + size), slice(new_start, new_start + size)
                positions[new], owner[new] = self.positions[old], self.owner[old]
                for name, tensor in state.items():
                    tensor[new] = self.state[name][old]
        self.positions, self.owner, self.state = positions, owner, state
        self.spans, self.starts = list(spans), starts
        self._bounds: torch.Tensor | None = None  # see bounds()
        # [rows]: the region (layer) of each row, spare rows included
        self.region_of_row = torch.arange(len(spans), device=dev).repeat_interleave(torch.tensor(spans, device=dev))

    def reserve(self, rows: list[int]) -> None:
        """Each region is about to grow to ``rows[region]`` rows: make room for all of them in one
        layout now (a prompt grows every layer's pool, which would otherwise move the layout
        and rebind every pool once per layer)."""
        self.wanted = list(rows)
        spans = [math.ceil(want * REGION_HEADROOM) if want > span else span for span, want in zip(self.spans, rows)]
        if spans != self.spans:
            self._layout(spans, keep=True)
            for pool in self._pools.values():
                pool.bind()

    def _needs(self, region: int, blocks: int) -> list[int]:
        """Rows each region needs once ``region`` has ``blocks``: its size, or a reservation not yet taken."""
        return [blocks if i == region else max(size, want) for i, (size, want) in enumerate(zip(self.sizes, self.wanted))]

    def resize(self, region: int, blocks: int, keep: bool) -> None:
        """Region ``region`` now has ``blocks`` used rows: its first rows kept (``keep``, up to the
        old size) or all reset to free blocks. Tells the pools whose views changed."""
        old_size = self.sizes[region]
        self.wanted[region] = 0
        moved = blocks > self.spans[region]
        if moved:
            spans = list(self.spans)
            spans[region] = math.ceil(blocks * REGION_HEADROOM)
            if not keep:
                self.sizes[region] = 0
            self._layout(spans, keep=True)
        elif sum(self.spans) > REGION_SPARE_MAX * sum(self._needs(region, blocks)) + 8 * len(self.spans):
            # regions left mostly spare by pools that shrank: lay out again, smaller
            needs = self._needs(region, blocks)
            self.sizes[region] = min(old_size, blocks) if keep else 0
            self._layout([math.ceil(max(need, 1) * REGION_HEADROOM) for need in needs], keep=True)
            moved = True
        start = self.starts[region]
        kept = min(old_size, blocks) if keep else 0
        stale = slice(start + kept, start + max(old_size, blocks)) if not moved else slice(start + kept, start + blocks)
        self.positions[stale] = -1
        self.owner[stale] = -1
        for name, (_, fresh) in self.state_fields.items():
            self.state[name][stale] = fresh
        self.sizes[region] = blocks
        self._bounds = None
        for index, pool in self._pools.items():
            if moved or index == region:
                pool.bind()

    def views(self, region: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``region``'s used rows of positions, owner and state (views: writes go to the shared tensors)."""
        rows = slice(self.starts[region], self.starts[region] + self.sizes[region])
        return self.positions[rows], self.owner[rows], {name: tensor[rows] for name, tensor in self.state.items()}

    # --------------------------------------------------------------- free slots
    def bounds(self) -> torch.Tensor:
        """[2, regions]: each region's first row and its used rows (made again after a resize)."""
        if self._bounds is None:
            self._bounds = torch.tensor([self.starts, self.sizes], dtype=torch.long, device=self.device)
        return self._bounds

    def free_slots(self, streams: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[regions, streams] each: each stream's lowest free slot among its pool's blocks that
        it owns (the pool's slot id; -1 where it has none), and how many free slots those
        blocks hold; every region in one pass.

        Why: a stream that evicts keys can store its next ones in the holes they leave, so that
        a pool under eviction neither takes fresh blocks nor needs repacking as often."""
        regions = len(self.spans)
        found = paged_kernel.free_slots(self.positions, self.owner, self.bounds(), streams)
        if found is not None:
            return found[0].view(regions, streams), found[1].view(regions, streams)
        free = (self.positions < 0) & (self.owner >= 0)[:, None]
        row_free = free.sum(dim=1)
        row_in_region = torch.arange(len(free), device=self.device) - self.bounds()[0][self.region_of_row]
        slot = row_in_region * self.block_size + free.to(torch.uint8).argmax(dim=1)  # (argmax: the first)
        stream = torch.where(row_free > 0, self.region_of_row * streams + self.owner, regions * streams)
        none = torch.iinfo(torch.long).max
        lowest = torch.full((regions * streams + 1,), none, dtype=torch.long, device=self.device)
        lowest.scatter_reduce_(0, stream, slot, "amin")
        count = torch.zeros(regions * streams + 1, dtype=torch.long, device=self.device).index_add_(0, stream, row_free)
        lowest = lowest[:-1].masked_fill_(lowest[:-1] == none, -1)
        return lowest.view(regions, streams), count[:-1].view(regions, streams)

    def make_fresh(self, slots: torch.Tensor) -> None:
        """Reset the policy state of ``slots`` [regions, n] (each region's slot ids) to fresh."""
        flat = (slots + self.bounds()[0][:, None] * self.block_size).view(-1)
        for name, (_, fresh) in self.state_fields.items():
            self.state[name].view(-1).index_fill_(0, flat, fresh)

    # ----------------------------------------------------------------- scratch
    def scratch_rows(self, name: str, region: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """``region``'s used rows of this step's [rows, *shape] scratch tensor ``name`` (made,
        uninitialised, at its first use in a step; :meth:`end_scratch` lets it go). The layout
        must not move while a step's scratch is in use."""
        tensor = self.scratch.get(name)
        if tensor is None:
            tensor = self.scratch[name] = torch.empty(sum(self.spans), *shape, dtype=dtype, device=self.device)
        return tensor[self.starts[region]:self.starts[region] + self.sizes[region]]

    def end_scratch(self) -> dict[str, torch.Tensor]:
        """This step's scratch (then let go: it is not held between steps)."""
        scratch, self.scratch = self.scratch, {}
        return scratch

    def storage_tensors(self) -> list[torch.Tensor]:
        return [self.positions, self.owner, *self.state.values()]
