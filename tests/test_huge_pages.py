"""Huge pages under the cache's pools: asked for where the host offers them, nothing else changed."""

from __future__ import annotations

import pytest
import torch

import cormlm
from cormlm import huge_pages
from cormlm.config import ModelConfig
from cormlm.errors import InputError
from cormlm.models.transformer import CausalLM


def _huge_kib_at(address: int) -> int | None:
    """AnonHugePages (KiB) of the mapping holding ``address`` (None: not found)."""
    mapping = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            mapping = start <= address < end
        elif mapping and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


def test_advise_leaves_the_tensor_as_it_is():
    t = torch.arange(3 << 20, dtype=torch.float32)
    assert huge_pages.advise(t) is t and torch.equal(t, torch.arange(3 << 20, dtype=torch.float32))
    small = torch.ones(10)
    assert huge_pages.advise(small) is small
    e = huge_pages.empty(4, 1 << 20, dtype=torch.float32)
    assert e.shape == (4, 1 << 20) and e.untyped_storage().nbytes() == 16 << 20  # nothing held beyond its bytes


@pytest.mark.skipif(not huge_pages.available(), reason="transparent huge pages are off on this host")
def test_a_pool_lies_on_huge_pages_where_the_host_offers_them():
    """A pool grown past a few MiB has its keys on huge pages (whole 2 MiB pages inside it);
    its bytes held are still its tensors' own."""
    config = ModelConfig(family="llama", vocab_size=32, hidden_size=128, num_layers=1, num_heads=2, num_kv_heads=2,
                         head_dim=64, intermediate_size=64, max_position_embeddings=8192)
    model = CausalLM(config).eval()
    cache = cormlm.make_cache(model, cormlm.CacheConfig("full"), batch_size=4)
    with torch.inference_mode():
        model(torch.randint(0, 32, (4, 4096)), cache=cache, last_logits_only=True)
    pool = cache.pools[0]
    assert pool.keys.numel() * 4 >= 8 << 20
    assert (_huge_kib_at(pool.keys.data_ptr() + (4 << 20)) or 0) >= 2048
    assert cache.stats().bytes_held == sum(t.untyped_storage().nbytes() for t in cache.storage_tensors())


def test_the_setting_turns_them_off_and_a_misspelt_one_is_an_error(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV, "0")
    huge_pages._madvise.cache_clear()
    try:
        assert not huge_pages.available()
        monkeypatch.setenv(huge_pages.ENV, "yes")
        huge_pages._madvise.cache_clear()
        with pytest.raises(InputError, match="CORMLM_HUGE_PAGES='yes' is not a setting; use 1"):
            huge_pages.available()
    finally:
        monkeypatch.undo()
        huge_pages._madvise.cache_clear()
