"""The fused C decode-attention kernel: equal to the rule written naively, chosen by measurement,
and never the only way (no compiler, a forced path, shapes it does not take)."""

from __future__ import annotations

import time

import pytest
import torch
from trial_state import fresh_trials

from cormlm import native
from cormlm.cache import paged_kernel
from cormlm.cache.paged_attention import paged_decode_attention, tensor_decode_attention
from cormlm.errors import InputError
from cormlm.models.alibi import alibi_slopes
from cormlm.models.attention_ops import AttentionSpec
from cormlm.trials import TRIALS

pytestmark = pytest.mark.skipif(not paged_kernel.available(), reason="no C compiler to build the kernel with")


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    fresh_trials(monkeypatch, paged_kernel)
    monkeypatch.setattr(paged_kernel, "_prefetch_choices", {})
    monkeypatch.setattr(paged_kernel, "_prefetch_trials", {})
    monkeypatch.delenv(paged_kernel.PREFETCH_ENV, raising=False)


def random_pool(streams: int, group: int, head_dim: int, block: int, blocks: int, seed: int):
    """A pool as the cache leaves it: blocks owned by streams in any order, free blocks (owner -1,
    positions -1), holes (evicted slots, position -1) and streams of different lengths."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(blocks, head_dim, block, generator=g)
    values = torch.randn(blocks, block, head_dim, generator=g)
    owner = torch.randint(-1, streams, (blocks,), generator=g)
    owner[:streams] = torch.arange(streams)  # every stream owns a block
    positions = torch.randperm(blocks * block, generator=g)[: blocks * block].view(blocks, block).to(torch.int32)
    holes = torch.rand(blocks, block, generator=g) < 0.3
    positions[holes | (owner < 0)[:, None]] = -1
    for s in range(streams):  # each stream sees at least one key
        positions[s, 0] = s
    q = torch.randn(streams, group, head_dim, generator=g)
    q_pos = torch.full((streams,), blocks * block, dtype=torch.int32)
    return keys, values, positions, owner, q, q_pos


def naive_attention(keys, values, positions, owner, q, q_pos, scale, window):
    """The rule, one stream at a time in float64: softmax over the stream's visible keys
    (stored, and inside the window), output = probabilities @ values; probabilities per slot."""
    streams, group, _ = q.shape
    out = torch.zeros(q.shape, dtype=torch.float64)
    probs = torch.zeros(keys.shape[0], group, keys.shape[2], dtype=torch.float64)
    for s in range(streams):
        visible = (owner[:, None] == s) & (positions >= 0)
        if window is not None:
            visible &= (q_pos[s] - positions) < window
        b, j = visible.nonzero(as_tuple=True)
        k = keys.double()[b, :, j]  # [n, D]
        v = values.double()[b, j]
        p = torch.softmax(q[s].double() @ k.T * scale, dim=-1)  # [G, n]
        out[s] = p @ v
        probs[b, :, j] = p.T
    return out, probs


@pytest.mark.parametrize("streams,group,head_dim,block,blocks", [(1, 1, 8, 1, 5), (3, 3, 64, 16, 40),
                                                                  (5, 4, 80, 64, 11), (24, 3, 64, 16, 100)])
@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("seed", [0, 1])
@torch.inference_mode()
def test_kernel_equals_the_rule(streams, group, head_dim, block, blocks, window, seed):
    keys, values, positions, owner, q, q_pos = random_pool(streams, group, head_dim, block, blocks, seed)
    scale = head_dim**-0.5
    if window is not None:  # keep the first slot of each stream inside the window
        positions[:streams, 0] = q_pos[0] - 1
    expected_out, expected_probs = naive_attention(keys, values, positions, owner, q, q_pos, scale, window)
    reduced = {"heads": expected_probs, "max": expected_probs.amax(dim=1, keepdim=True),
               "sum": expected_probs.sum(dim=1, keepdim=True)}
    for wanted in (None, "heads", "max", "sum"):
        out, probs = paged_kernel.run(keys, values, positions, owner, q, q_pos, scale, window, wanted)
        torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)
        if wanted is None:
            assert probs is None
        else:
            torch.testing.assert_close(probs.double(), reduced[wanted], rtol=1e-5, atol=1e-6)


@torch.inference_mode()
def test_what_a_call_returns_is_its_own_after_the_workspace_is_reused():
    """The kernel's scratch is kept between calls (one workspace per thread, grown to the
    largest call): outputs and returned probabilities are the caller's, a later call of any
    size leaves them as they were, and a grown workspace still gives the rule."""
    small, large = random_pool(3, 3, 16, 4, 12, 0), random_pool(5, 2, 32, 8, 60, 1)
    results = {wanted: paged_kernel.run(*small, 0.25, None, wanted) for wanted in ("heads", "max", "sum")}
    kept = {wanted: (out.clone(), probs.clone()) for wanted, (out, probs) in results.items()}
    for wanted in (None, "heads", "max", "sum"):
        paged_kernel.run(*small, 0.25, None, wanted)
        paged_kernel.run(*large, 0.25, None, wanted)
    for wanted, (out, probs) in results.items():
        assert torch.equal(out, kept[wanted][0]) and torch.equal(probs, kept[wanted][1])
    expected_out, _ = naive_attention(*large, 0.25, None)
    torch.testing.assert_close(paged_kernel.run(*large, 0.25, None, "max")[0].double(), expected_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@torch.inference_mode()
def test_kernel_equals_the_rule_with_the_free_blocks_at_the_end(threads, monkeypatch):
    """A pool takes its lowest free blocks first, so its free blocks gather at the end; the
    kernel splits the owned blocks between its threads (not the block range): any split must
    give the rule's output and probabilities."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    for seed in range(3):
        keys, values, positions, owner, q, q_pos = random_pool(5, 3, 64, 16, 40, seed)
        owner[5:30] = torch.arange(25) % 5  # owned blocks first, in any stream order
        owner[30:], positions[30:] = -1, -1
        expected_out, expected_probs = naive_attention(keys, values, positions, owner, q, q_pos, 0.125, None)
        out, probs = paged_kernel.run(keys, values, positions, owner, q, q_pos, 0.125, None, "heads")
        torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probs.double(), expected_probs, rtol=1e-5, atol=1e-6)


@torch.inference_mode()
def test_kernel_built_for_8_lane_vectors_equals_the_rule(narrow_vectors):
    """Register tiles over 8-lane vectors (block and head sizes whole vectors of 8, or not)."""
    narrow_vectors(paged_kernel.KERNEL)
    for streams, group, head_dim, block, blocks in [(3, 3, 64, 16, 40), (5, 4, 80, 64, 11), (2, 8, 40, 8, 20),
                                                    (4, 5, 12, 16, 9)]:
        keys, values, positions, owner, q, q_pos = random_pool(streams, group, head_dim, block, blocks, seed=2)
        expected_out, expected_probs = naive_attention(keys, values, positions, owner, q, q_pos, 0.125, None)
        out, probs = paged_kernel.run(keys, values, positions, owner, q, q_pos, 0.125, None, "heads")
        torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probs.double(), expected_probs, rtol=1e-5, atol=1e-6)


@torch.inference_mode()
def test_kernel_equals_the_tensor_operations_on_a_non_contiguous_query():
    """Also pins the tensor operations' reduced probabilities to the kernel's (which the rule pins)."""
    keys, values, positions, owner, q, q_pos = random_pool(6, 3, 64, 16, 30, seed=2)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    spec = AttentionSpec(num_heads=18, num_kv_heads=6, head_dim=64, scale=0.125)
    for wanted in ("heads", "max", "sum"):
        out, probs = paged_kernel.run(keys, values, positions, owner, q, q_pos, spec.scale, None, wanted)
        ref_out, ref_probs = tensor_decode_attention(keys, values, positions, owner, q, q_pos, spec, wanted)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-7)


def _calls(path: str, monkeypatch) -> list[str]:
    """Which path each of 2 * (TRIALS + 1) + 3 calls took, ``path`` made 2 ms slower."""
    taken: list[str] = []
    real_run, real_tensor = paged_kernel.run, tensor_decode_attention

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            taken.append(name)
            if name == path:
                time.sleep(0.002)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(paged_kernel, "run", spy("native", real_run))
    monkeypatch.setattr("cormlm.cache.paged_attention.tensor_decode_attention", spy("torch", real_tensor))
    keys, values, positions, owner, q, q_pos = random_pool(3, 3, 64, 16, 20, seed=3)
    spec = AttentionSpec(num_heads=9, num_kv_heads=3, head_dim=64, scale=0.125)
    with torch.inference_mode():
        for _ in range(2 * (TRIALS + 1) + 3):
            paged_decode_attention(keys, values, positions, owner, q, q_pos, spec, probs="heads")
    return taken


@pytest.mark.parametrize("slow", ["native", "torch"])
def test_the_faster_path_is_kept_after_the_trials(slow, monkeypatch):
    taken = _calls(slow, monkeypatch)
    trials = 2 * (TRIALS + 1)
    assert sorted(set(taken[:trials])) == ["native", "torch"] and taken[:trials].count("native") == trials // 2
    fast = "torch" if slow == "native" else "native"
    assert taken[trials:] == [fast] * 3
    assert any(f": {fast}" in line and "probabilities" in line for line in paged_kernel.kernel_status())


@pytest.mark.parametrize("forced", ["native", "torch"])
def test_a_forced_path_runs_no_trials(forced, monkeypatch):
    monkeypatch.setenv(paged_kernel.FORCE_ENV, forced)
    assert set(_calls(forced, monkeypatch)) == {forced}
    assert paged_kernel._trials == {} and paged_kernel._choices == {}


def test_a_misspelt_forced_path_names_the_choices(monkeypatch):
    monkeypatch.setenv(paged_kernel.FORCE_ENV, "fast")
    with pytest.raises(InputError, match="is not a decode-attention path; use one of native, torch"):
        _calls("native", monkeypatch)


def test_without_a_compiler_the_tensor_operations_run(monkeypatch, tmp_path):
    monkeypatch.setenv("CORMLM_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "compiler", lambda: None)
    paged_kernel.KERNEL.reset()
    try:
        assert set(_calls("native", monkeypatch)) == {"torch"}
        assert paged_kernel.kernel_status() == ["native kernel unavailable (no C compiler (cc, gcc or clang) on PATH): "
                                                "tensor operations"]
    finally:
        paged_kernel.KERNEL.reset()


def test_a_compiler_error_leaves_the_tensor_operations(monkeypatch, tmp_path):
    monkeypatch.setenv("CORMLM_CACHE", str(tmp_path))
    monkeypatch.setattr(paged_kernel.KERNEL, "flags", (*native.FLAGS, "-fno-such-flag"))
    paged_kernel.KERNEL.reset()
    try:
        assert not paged_kernel.available()
        assert "could not build or load it" in paged_kernel.kernel_status()[0]
        assert not list((tmp_path / "kernels").glob("*.so"))  # no partial library left to load later
    finally:
        paged_kernel.KERNEL.reset()


def test_the_library_is_built_once_per_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("CORMLM_CACHE", str(tmp_path))
    compiler = native.compiler()
    first = native.build(paged_kernel.SOURCE, compiler)
    built_at = first.stat().st_mtime_ns
    assert native.build(paged_kernel.SOURCE, compiler) == first and first.stat().st_mtime_ns == built_at  # reused
    monkeypatch.setattr(native, "cpu_signature", lambda: "model name : another CPU")
    assert native.build(paged_kernel.SOURCE, compiler) != first  # another CPU never loads this one's binary


@pytest.mark.parametrize("changed", [0, 1])
def test_a_changed_shared_header_builds_the_kernel_again(monkeypatch, tmp_path, changed):
    """The kernels include native_vectors.h and native_tiles.h: a binary built from another
    version of either is never loaded (the headers are part of the build's key), and the
    include path is passed."""
    monkeypatch.setenv("CORMLM_CACHE", str(tmp_path))
    compiler = native.compiler()
    first = native.build(paged_kernel.SOURCE, compiler)
    headers = tuple(tmp_path / header.name for header in native.HEADERS)
    for i, (header, original) in enumerate(zip(headers, native.HEADERS)):
        header.write_text(original.read_text() + "\n/* another version */\n" * (i == changed))
    monkeypatch.setattr(native, "HEADERS", headers)
    assert native.build(paged_kernel.SOURCE, compiler) != first


@torch.inference_mode()
def test_calls_the_kernel_cannot_take_use_the_tensor_operations(monkeypatch):
    monkeypatch.setenv(paged_kernel.FORCE_ENV, "native")
    monkeypatch.setattr(paged_kernel, "run", lambda *a, **k: pytest.fail("the kernel ran"))
    keys, values, positions, owner, q, q_pos = random_pool(3, 3, 64, 16, 20, seed=4)
    spec = AttentionSpec(num_heads=9, num_kv_heads=3, head_dim=64, scale=0.125)
    alibi = AttentionSpec(num_heads=9, num_kv_heads=3, head_dim=64, scale=0.125, alibi_slopes=alibi_slopes(9))
    paged_decode_attention(keys, values, positions, owner, q, q_pos, alibi, "heads")
    bf16 = [t.bfloat16() for t in (keys, values, q)]
    paged_decode_attention(bf16[0], bf16[1], positions, owner, bf16[2], q_pos, spec, "heads")


def test_a_growing_pool_is_measured_once_per_power_of_two(monkeypatch):
    spec = AttentionSpec(num_heads=9, num_kv_heads=3, head_dim=64, scale=0.125)
    with torch.inference_mode():
        for blocks in (33, 40, 64, 33, 64, 65):
            keys, values, positions, owner, q, q_pos = random_pool(3, 3, 64, 16, blocks, seed=blocks)
            for _ in range(2 * (TRIALS + 1)):
                paged_decode_attention(keys, values, positions, owner, q, q_pos, spec, probs=None)
    assert sorted(key[1] for key in paged_kernel._choices) == [64, 128]
    assert paged_kernel._trials == {}


def test_an_unknown_probabilities_form_is_refused():
    keys, values, positions, owner, q, q_pos = random_pool(3, 3, 64, 16, 10, seed=4)
    spec = AttentionSpec(num_heads=9, num_kv_heads=3, head_dim=64, scale=0.125)
    with pytest.raises(ValueError, match="probs must be one of .*got 'mean'"), torch.inference_mode():
        paged_decode_attention(keys, values, positions, owner, q, q_pos, spec, probs="mean")


@torch.inference_mode()
@pytest.mark.parametrize("streams,block,strided", [(1, 16, False), (6, 4, True), (24, 64, True)])
def test_the_append_kernel_writes_what_the_tensor_operations_write(streams, block, strided, monkeypatch):
    """A decode step's append in one C call: the same keys (transposed per block), values,
    positions and slots as the tensor operations, over several tail blocks taken as they
    fill, with key rows that are not contiguous."""
    from cormlm.cache.paged import BlockPool

    if paged_kernel.APPEND.function() is None:
        pytest.skip(f"no C kernel here: {paged_kernel.APPEND.unavailable}")
    torch.manual_seed(streams)
    d, calls, real = 12, [], paged_kernel.append
    pools = [BlockPool(streams, block, d, torch.float32, torch.device("cpu"), {}) for _ in range(2)]
    for step in range(3 * block + 1):
        keys = torch.randn(streams, 2 * d)[:, ::2] if strided else torch.randn(streams, d)
        values, positions = torch.randn(streams, d), torch.full((streams,), step, dtype=torch.int32)
        slots = []
        for pool, kernel in zip(pools, (True, False)):
            pool.make_tail_room()
            monkeypatch.setattr(paged_kernel, "append", lambda *args, kernel=kernel: (
                calls.append(1) or real(*args)) if kernel else None)
            slots.append(pool.append_one(keys, values, positions))
            monkeypatch.undo()
            pool.appended_one()
        assert torch.equal(slots[0], slots[1])
    for name in ("keys", "values", "positions", "tail", "fill"):
        assert torch.equal(getattr(pools[0], name), getattr(pools[1], name)), name
    assert len(calls) == 3 * block + 1


@torch.inference_mode()
@pytest.mark.parametrize("streams,block", [(1, 16), (6, 4), (24, 64)])
def test_the_append_kernel_writes_into_chosen_slots_what_the_tensor_operations_write(streams, block, monkeypatch):
    """A decode step's append into slots the cache chose (holes of each stream's own blocks,
    in any order): the same keys, values and positions as the tensor operations, and the
    slots it was given."""
    from cormlm.cache.paged import BlockPool

    if paged_kernel.APPEND.function() is None:
        pytest.skip(f"no C kernel here: {paged_kernel.APPEND.unavailable}")
    torch.manual_seed(streams + block)
    d, real = 12, paged_kernel.append
    pools = [BlockPool(streams, block, d, torch.float32, torch.device("cpu"), {}) for _ in range(2)]
    for pool in pools:
        pool.give_blocks(torch.arange(streams).repeat(3))
    owned = pools[0].owner.clone()
    free = [torch.randperm(3 * block) for _ in range(streams)]  # each stream's slots in a random order
    blocks = [(owned == s).nonzero()[:, 0] for s in range(streams)]
    for step in range(3 * block):
        chosen = torch.stack([blocks[s][free[s][step] // block] * block + free[s][step] % block
                              for s in range(streams)])
        keys = torch.randn(streams, 2 * d)[:, ::2]
        values, positions = torch.randn(streams, d), torch.full((streams,), step, dtype=torch.int32)
        slots = []
        for pool, kernel in zip(pools, (True, False)):
            pool.next_slot = chosen
            if not kernel:
                monkeypatch.setattr(paged_kernel, "append", lambda *args: None)
            slots.append(pool.append_one(keys, values, positions))
            monkeypatch.setattr(paged_kernel, "append", real)
            pool.appended_one()
        assert torch.equal(slots[0], chosen) and torch.equal(slots[1], chosen)
    for name in ("keys", "values", "positions"):
        assert torch.equal(getattr(pools[0], name), getattr(pools[1], name)), name
    assert (pools[0].positions[owned >= 0] >= 0).all(), "every slot of the streams' blocks written once"


@pytest.mark.parametrize("fetch", paged_kernel.PREFETCH)
def test_either_prefetch_gives_what_the_tensor_operations_give(fetch, monkeypatch):
    """The kernel asking for its next blocks or leaving that to the hardware: the same output
    and probabilities as the tensor operations (threads splitting the blocks, free ones among
    them)."""
    monkeypatch.setenv(paged_kernel.PREFETCH_ENV, fetch)
    keys, values, positions, owner, q, q_pos = random_pool(5, 3, 64, 16, 40, seed=11)
    spec = AttentionSpec(num_heads=15, num_kv_heads=5, head_dim=64, scale=0.125)
    out, probs = paged_kernel.run(keys, values, positions, owner, q, q_pos, spec.scale, None, "heads")
    ref_out, ref_probs = tensor_decode_attention(keys, values, positions, owner, q, q_pos, spec, "heads")
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-7)
    assert paged_kernel._prefetch_trials == {} and paged_kernel._prefetch_choices == {}


@pytest.mark.parametrize("slow", paged_kernel.PREFETCH)
def test_the_faster_prefetch_is_kept_after_its_trials(slow, monkeypatch):
    """Each shape's calls alternate between asking for the next blocks and not; the faster
    (here the other one made 2 ms slower) is kept and listed in kernel_status."""
    real = paged_kernel.KERNEL.function()
    asked = []

    def kernel(*args):
        asked.append(paged_kernel.PREFETCH[0] if args[-1] else paged_kernel.PREFETCH[1])
        if asked[-1] == slow:
            time.sleep(0.002)
        return real(*args)

    monkeypatch.setattr(paged_kernel.KERNEL, "function", lambda: kernel)
    keys, values, positions, owner, q, q_pos = random_pool(3, 3, 64, 16, 20, seed=3)
    for _ in range(2 * (TRIALS + 1) + 3):
        paged_kernel.run(keys, values, positions, owner, q, q_pos, 0.125, None, None)
    trials = 2 * (TRIALS + 1)
    assert sorted(asked[:trials]) == sorted(paged_kernel.PREFETCH * (TRIALS + 1))
    fast = next(name for name in paged_kernel.PREFETCH if name != slow)
    assert asked[trials:] == [fast] * 3
    assert any(line.endswith(f": native, {fast} prefetch") for line in paged_kernel.kernel_status())


def test_a_misspelt_prefetch_names_the_choices(monkeypatch):
    monkeypatch.setenv(paged_kernel.PREFETCH_ENV, "always")
    keys, values, positions, owner, q, q_pos = random_pool(3, 3, 64, 16, 20, seed=3)
    with pytest.raises(InputError, match="is not a decode-attention prefetch; use one of software, hardware"):
        paged_kernel.run(keys, values, positions, owner, q, q_pos, 0.125, None, None)
