"""The shared bookkeeping of a cache's pools: whatever the sequence of resizes, each region
keeps what it is told to keep, takes fresh rows, leaves every row past its pool free, and its
pool's views write into the shared tensors."""

from __future__ import annotations

import random

import pytest
import torch

from cormlm.cache.slot_index import SlotIndex

FIELDS = {"keep_until": (torch.float32, 7.0)}
BLOCK = 4


class Pool:
    """What a pool keeps of the index: its views, taken again when told."""

    def __init__(self, index: SlotIndex, region: int) -> None:
        self.index, self.region, self.binds = index, region, 0
        index.attach(region, self)

    def bind(self) -> None:
        self.positions, self.owner, self.state = self.index.views(self.region)
        self.binds += 1


def _fill(pool: Pool, stamp: int) -> None:
    """Mark every used row of the pool with values only it would write."""
    rows = pool.positions.shape[0]
    pool.positions.copy_(torch.arange(rows * BLOCK, dtype=torch.int32).view(rows, BLOCK) + stamp * 1000)
    pool.owner.copy_(torch.full((rows,), stamp, dtype=torch.long))
    pool.state["keep_until"].fill_(float(stamp))


@pytest.mark.parametrize("seed", range(6))
def test_regions_keep_their_rows_and_leave_the_rest_free(seed):
    rng = random.Random(seed)
    index = SlotIndex(4, BLOCK, FIELDS, torch.device("cpu"))
    pools = [Pool(index, region) for region in range(4)]
    stamps = [0] * 4
    for step in range(60):
        region = rng.randrange(4)
        pool = pools[region]
        before = {r: (p.positions.clone(), p.owner.clone(), p.state["keep_until"].clone()) for r, p in enumerate(pools)}
        blocks = rng.choice([0, 1, rng.randrange(1, 40), pool.positions.shape[0] + rng.randrange(1, 9)])
        keep = rng.random() < 0.7
        old = pool.positions.shape[0]
        index.resize(region, blocks, keep=keep)
        assert pool.positions.shape[0] == pool.owner.shape[0] == blocks == index.sizes[region]
        kept = min(old, blocks) if keep else 0
        positions, owner, state = before[region]
        assert torch.equal(pool.positions[:kept], positions[:kept]) and torch.equal(pool.owner[:kept], owner[:kept])
        assert torch.equal(pool.state["keep_until"][:kept], state[:kept])
        # rows taken now are free blocks with fresh state
        assert (pool.positions[kept:] == -1).all() and (pool.owner[kept:] == -1).all()
        assert (pool.state["keep_until"][kept:] == 7.0).all()
        for other, p in enumerate(pools):  # the other regions lost nothing, wherever they now lie
            if other != region:
                assert all(torch.equal(a, b) for a, b in zip((p.positions, p.owner, p.state["keep_until"]),
                                                                before[other]))
        # every row outside the pools' views is a free block: an all-rows pass skips it
        used = torch.zeros(sum(index.spans), dtype=torch.bool)
        for r in range(4):
            used[index.starts[r]:index.starts[r] + index.sizes[r]] = True
        assert (index.positions[~used] == -1).all() and (index.owner[~used] == -1).all()
        assert torch.equal(index.region_of_row, torch.repeat_interleave(torch.arange(4), torch.tensor(index.spans)))
        stamps[region] = step + 1
        _fill(pool, stamps[region])  # views write into the shared tensors
        rows = slice(index.starts[region], index.starts[region] + blocks)
        assert (index.owner[rows] == stamps[region]).all()
    assert sum(index.spans) <= 1.25 * sum(index.sizes) + 8 * 4 + max(index.spans), "regions left mostly spare"


def test_scratch_is_laid_out_as_the_index_and_not_held():
    index = SlotIndex(3, BLOCK, FIELDS, torch.device("cpu"))
    for region, blocks in enumerate((5, 0, 9)):
        index.resize(region, blocks, keep=False)
    for region in range(3):
        index.scratch_rows("probs", region, (1, BLOCK), torch.float32).fill_(region)
    scratch = index.end_scratch()["probs"]
    assert scratch.shape[0] == sum(index.spans)
    assert (scratch[index.starts[2]:index.starts[2] + 9] == 2).all() and (scratch[index.starts[0]:5] == 0).all()
    assert index.scratch == {} and all(t.data_ptr() != scratch.data_ptr() for t in index.storage_tensors())


def test_a_reservation_lays_out_once_for_every_growing_region():
    """A prompt grows every layer's pool: reserved first, the regions then grow without moving
    the layout (no rebinding of every pool per layer), and keep what they held."""
    index = SlotIndex(5, BLOCK, FIELDS, torch.device("cpu"))
    pools = [Pool(index, region) for region in range(5)]
    for region, pool in enumerate(pools):
        index.resize(region, 3, keep=False)
        _fill(pool, region + 1)
    binds = [p.binds for p in pools]
    index.reserve([40, 3, 60, 50, 3])
    assert [p.binds for p in pools] == [b + 1 for b in binds]  # one layout, every pool told once
    binds = [p.binds for p in pools]
    starts = list(index.starts)
    for region, blocks in ((0, 40), (2, 60), (3, 50)):
        index.resize(region, blocks, keep=True)
        # no move: only the region's own pool rebinds, and no shrinking relayout undoes the
        # reservations of the regions that have not grown yet
        assert index.starts == starts
        binds[region] += 1
        assert [p.binds for p in pools] == binds
        assert (pools[region].owner[:3] == region + 1).all() and (pools[region].owner[3:] == -1).all()
    assert index.wanted[:4] == [0, 3, 0, 0]


def test_reserved_rows_not_taken_are_left_when_the_layout_shrinks():
    index = SlotIndex(2, BLOCK, FIELDS, torch.device("cpu"))
    Pool(index, 0), Pool(index, 1)
    index.resize(0, 100, keep=False)
    index.reserve([100, 80])
    index.resize(0, 2, keep=True)  # region 0 shrinks a lot: the layout is made smaller...
    assert index.spans[1] >= 80  # ...but region 1's reservation survives it
    assert index.spans[0] < 100


def _naive_free_slots(index: SlotIndex, streams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule, one slot at a time: each (region, stream)'s lowest free slot in the rows it
    owns, and its free slots there."""
    lowest = torch.full((len(index.spans), streams), -1, dtype=torch.long)
    count = torch.zeros_like(lowest)
    for region, (start, span) in enumerate(zip(index.starts, index.spans)):
        for row in range(span):
            stream = int(index.owner[start + row])
            if stream < 0:
                continue
            for j in range(index.block_size):
                if index.positions[start + row, j] < 0:
                    count[region, stream] += 1
                    slot = row * index.block_size + j
                    if lowest[region, stream] < 0 or slot < lowest[region, stream]:
                        lowest[region, stream] = slot
    return lowest, count


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_free_slots_are_each_streams_lowest_and_count_of_its_own_blocks(seed, native, monkeypatch):
    """The slots decode steps of an evicting cache store into: in C and in tensor operations,
    the same as the rule, over regions of any size with free rows, spare rows, full blocks and
    streams that own no free slot."""
    from cormlm.cache import paged_kernel

    if native and paged_kernel.FREE_SLOTS.function() is None:
        pytest.skip(f"no C kernel here: {paged_kernel.FREE_SLOTS.unavailable}")
    if not native:
        monkeypatch.setattr(paged_kernel, "free_slots", lambda *args: None)
    g = torch.Generator().manual_seed(seed)
    streams, regions = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    index = SlotIndex(regions, BLOCK, FIELDS, torch.device("cpu"))
    pools = [Pool(index, region) for region in range(regions)]
    for region in range(regions):
        index.resize(region, int(torch.randint(0, 30, (1,), generator=g)), keep=False)
    for pool in pools:
        rows = pool.owner.shape[0]
        full = torch.rand(rows, BLOCK, generator=g) < float(torch.rand(1, generator=g))
        pool.positions.copy_(torch.where(full, 5, -1).to(torch.int32))
        pool.owner.copy_(torch.randint(-1, streams, (rows,), generator=g))
    lowest, count = index.free_slots(streams)
    expected_lowest, expected_count = _naive_free_slots(index, streams)
    assert torch.equal(lowest, expected_lowest) and torch.equal(count, expected_count)


def test_make_fresh_resets_the_given_slots_state_only():
    index = SlotIndex(3, BLOCK, FIELDS, torch.device("cpu"))
    pools = [Pool(index, region) for region in range(3)]
    for region, rows in enumerate((5, 2, 7)):
        index.resize(region, rows, keep=False)
        pools[region].state["keep_until"].fill_(1.0)
    slots = torch.tensor([[0, 19], [3, 4], [27, 9]])
    index.make_fresh(slots)
    for pool, chosen in zip(pools, slots):
        state = pool.state["keep_until"].view(-1)
        fresh = torch.zeros_like(state, dtype=torch.bool)
        fresh[chosen] = True
        assert (state[fresh] == 7.0).all() and (state[~fresh] == 1.0).all()
