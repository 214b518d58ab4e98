"""The router's cluster index stays within its bounds (router.cluster_cache), forgetting the least
recently stored or hit entry, with its per-worker reverse maps matching the forward maps."""

from __future__ import annotations

import pytest

from bus.messages import ImageRef
from router.cluster_index import MAX_KV_ENTRIES, ClusterIndex
from router.serve import cluster_cache_args
from router.server import parse_args


def _consistent(idx: ClusterIndex) -> None:
    """kv_of / emb_of name exactly the (worker, hash) pairs of kv / emb."""
    forward = {(w, h) for h, ws in idx.kv.items() for w in ws}
    assert forward == {(w, h) for w, hs in idx.kv_of.items() for h in hs}
    assert all(idx.kv.values())  # no entry without a holder
    forward = {(w, h) for h, ws in idx.emb.items() for w in ws}
    assert forward == {(w, h) for w, hs in idx.emb_of.items() for h in hs}
    assert all(idx.emb.values())


def _ref(h: str) -> ImageRef:
    return ImageRef(h, 4, None, {"zmq": "tcp://x"})


def test_kv_bound_holds_under_many_inserts():
    idx = ClusterIndex(max_kv_entries=100)
    for i in range(5_000):
        idx.kv_event(f"w{i % 2}", [f"r{i}b0", f"r{i}b1"], [f"r{i - 50}b1"] if i >= 50 else [])
        assert len(idx.kv) <= 100
    assert len(idx.kv) == 100
    assert idx.evictions["kv_blocks"] == 2 * 5_000 - (5_000 - 50) - 100  # stored - evicted by workers - kept
    assert sum(len(hs) for hs in idx.kv_of.values()) == 100
    _consistent(idx)


def test_kv_lru_order_and_chain_heads_last():
    idx = ClusterIndex(max_kv_entries=4)
    idx.kv_event("p0", ["a1", "a2"], [])  # chain a: a1 -> a2
    idx.kv_event("p1", ["b1", "b2"], [])
    assert list(idx.kv) == ["a2", "a1", "b2", "b1"]  # a chain's head is its newest entry
    assert idx.longest_prefix(["a1", "a2"], "d0", {"p0", "p1"}) == ({"p0"}, 2)  # a hit refreshes chain a
    idx.kv_event("p1", ["c1"], [])
    assert list(idx.kv) == ["b1", "a2", "a1", "c1"]  # b2, least recently used, went
    assert idx.longest_prefix(["b1", "b2"], "d0", {"p0", "p1"}) == ({"p1"}, 1)  # only b's head is left
    idx.kv_event("p0", ["a2"], [])  # stored again by another event: recent again
    idx.kv_event("p1", ["d1"], [])
    assert list(idx.kv) == ["c1", "b1", "a2", "d1"]  # the b1 hit kept it; a1 went
    assert idx.evictions["kv_blocks"] == 2 and idx.stats()["kv_blocks"] == 4
    _consistent(idx)


def test_kv_eviction_of_a_shared_block_leaves_every_holder():
    idx = ClusterIndex(max_kv_entries=2)
    idx.kv_event("p0", ["s"], [])
    idx.kv_event("p1", ["s"], [])
    idx.kv_event("p0", ["x", "y"], [])
    assert "s" not in idx.kv and "s" not in idx.kv_of["p0"] and "s" not in idx.kv_of["p1"]
    idx.kv_event("p1", [], ["s"])  # a worker's own eviction of a forgotten block is harmless
    _consistent(idx)


def test_forget_worker_after_evictions():
    idx = ClusterIndex(max_kv_entries=50, max_embedding_entries=5)
    for i in range(200):
        idx.kv_event(f"w{i % 2}", [f"h{i}"], [])
        idx.kv_event("w2", [f"h{i}"], [])  # w2 holds everything the others do
        idx.embedding_stored(f"e{i % 2}", _ref(f"pix{i}"))
    _consistent(idx)
    idx.forget_worker("w0")
    idx.forget_worker("e1")
    assert "w0" not in idx.kv_of and all("w0" not in ws for ws in idx.kv.values())
    assert "e1" not in idx.emb_of and all("e1" not in ws for ws in idx.emb.values())
    _consistent(idx)
    idx.forget_worker("w1")
    idx.forget_worker("w2")
    idx.forget_worker("e0")
    assert not idx.kv and not idx.emb and not idx.kv_of and not idx.emb_of


def test_embedding_bound_and_lru_with_hits():
    idx = ClusterIndex(max_embedding_entries=3, max_aliases=3)
    for i in range(3):
        idx.learn_alias(f"bytes{i}", f"pix{i}")
        idx.embedding_stored("e0", _ref(f"pix{i}"))
    assert idx.embedding_for("bytes0", {"e0"}) == _ref("pix0")  # a hit: pix0 is recent again
    idx.embedding_stored("e1", _ref("pix3"))
    assert list(idx.emb) == ["pix2", "pix0", "pix3"]  # pix1 went
    assert idx.embedding_for("bytes1", {"e0"}) is None
    assert idx.evictions["embeddings"] == 1 and "pix1" not in idx.emb_of["e0"]
    idx.learn_alias("bytes3", "pix3")  # bytes0 and bytes1 were looked up since: bytes2 goes
    assert list(idx.aliases) == ["bytes0", "bytes1", "bytes3"] and idx.evictions["aliases"] == 1
    for i in range(100):
        idx.embedding_stored(f"e{i % 4}", _ref(f"many{i}"))
        assert len(idx.emb) <= 3
    _consistent(idx)


def test_bounds_must_be_positive():
    with pytest.raises(ValueError):
        ClusterIndex(max_kv_entries=0)


def test_bounds_from_config_to_router_flags():
    assert cluster_cache_args(True) == [] and cluster_cache_args(None) == []
    assert cluster_cache_args(False) == ["--no-cluster-cache"]
    flags = cluster_cache_args({"enabled": True, "max_kv_entries": 1000, "max_embedding_entries": 10})
    args = parse_args(["--served-model-name", "m", *flags])
    assert (args.cluster_cache, args.cluster_index_max_kv, args.cluster_index_max_embeddings) == (True, 1000, 10)
    args = parse_args(["--served-model-name", "m", *cluster_cache_args({"enabled": False})])
    assert not args.cluster_cache and args.cluster_index_max_kv == MAX_KV_ENTRIES
