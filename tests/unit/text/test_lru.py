"""LruCache: the least recently used entry goes first; `get` refreshes."""
from __future__ import annotations

from sampler_service.text.lru import LruCache


def test_the_least_recently_used_entry_is_evicted():
    cache: LruCache[str, int] = LruCache(2)
    assert cache.put("a", 1) == 1 and cache.put("b", 2) == 2
    assert cache.get("a") == 1          # "b" is now the least recently used
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    cache.put("a", 4)                   # replacing refreshes too
    cache.put("d", 5)
    assert cache.get("c") is None and cache.get("a") == 4
    cache.clear()
    assert cache.get("a") is None
