"""Content-hash caches across workers: the engine's prefix export/import and the router's index.

Engine level: one engine copies a prompt's leading blocks out, another takes
them instead of computing them, with identical greedy tokens; a prefix that
does not match the prompt is refused. Index level: events in, lookups out.
"""

from __future__ import annotations

import pytest
import torch

from bus.messages import ImageRef
from router.cluster_index import ClusterIndex
from stages.engine import SamplingParams
from tests.conftest import make_llm

SHARED = "You are a careful assistant. Answer briefly and exactly. " * 6


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models("llama")


def _greedy(llm, prompt: str, n: int = 10) -> list[int]:
    out = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return out[0].outputs[0].token_ids


def _run_prepared(engine, req, prefix) -> tuple[int, list[int]]:
    used = engine.submit(req, prefix)
    ids: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                ids = out.outputs[0].token_ids
    return used, ids


def test_prefix_moves_between_engines(llama):
    holder, taker, plain = make_llm(llama), make_llm(llama), make_llm(llama)
    _greedy(holder, SHARED + "First question?")  # the holder now caches the shared blocks
    prompt = SHARED + "Second question, a different one?"
    expected = _greedy(plain, prompt)

    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    eng = taker.engine
    req = eng.prepare_request("r1", prompt, params)
    hashes, local = eng.prefix_probe(req)
    assert local == 0 and len(hashes) >= 4
    kv, tokens = holder.engine.export_prefix(hashes)
    bs = eng.config.block_size
    n_shared = tokens.numel()
    assert n_shared % bs == 0 and n_shared >= 4 * bs
    assert tokens.tolist() == req.seq.prompt_token_ids[:n_shared]

    used, ids = _run_prepared(eng, req, (kv, tokens))
    assert used == n_shared  # taken, not recomputed
    assert ids == expected
    # The imported blocks are now in the taker's own prefix cache.
    req2 = eng.prepare_request("r2", prompt, params)
    assert eng.prefix_probe(req2)[1] * bs >= n_shared


def test_mismatched_prefix_is_refused(llama):
    holder, taker = make_llm(llama), make_llm(llama)
    _greedy(holder, SHARED + "First question?")
    hashes = holder.engine.blocks.prefix_hashes(
        holder.engine.prepare_request("h", SHARED + "First question?", SamplingParams()).seq)
    kv, tokens = holder.engine.export_prefix(hashes)
    prompt = "Something else entirely. " * 12
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    req = taker.engine.prepare_request("r", prompt, params)
    used, ids = _run_prepared(taker.engine, req, (kv, tokens))
    assert used == 0
    assert ids == _greedy(holder, prompt, 8)
    # A KV of the wrong shape for the right tokens is refused too.
    req = taker.engine.prepare_request("r2", SHARED + "First question?", params)
    used, _ = _run_prepared(taker.engine, req, (kv[:, :, :-1], tokens))
    assert used == 0


def test_export_drops_blocks_evicted_while_read(llama):
    """The engine thread may evict a block while another thread copies it out: the re-check
    after the read keeps only the run that stayed."""
    holder = make_llm(llama)
    _greedy(holder, SHARED + "First question?")
    eng = holder.engine
    hashes = eng.blocks.prefix_hashes(eng.prepare_request("h", SHARED + "First question?", SamplingParams()).seq)
    full_kv, full_tokens = eng.export_prefix(hashes)
    victim = eng.blocks.blocks_of(hashes)[3]
    read = eng.runner.read_blocks

    def read_while_evicting(blocks):
        out = read(blocks)
        eng.blocks._evict(victim)  # as if a step had reused block 3 meanwhile
        return out

    eng.runner.read_blocks = read_while_evicting
    kv, tokens = eng.export_prefix(hashes)
    bs = eng.config.block_size
    assert tokens.numel() == 3 * bs and tokens.tolist() == full_tokens[:3 * bs].tolist()
    assert kv.is_contiguous() and torch.equal(kv, full_kv[:, :, :3 * bs])


def test_index_longest_prefix_and_forgetting():
    idx = ClusterIndex()
    idx.kv_event("p0", ["a", "b", "c"], [])
    idx.kv_event("p1", ["a", "b"], [])
    idx.kv_event("d0", ["a", "b", "c", "d"], [])
    alive = {"p0", "p1", "d0"}
    assert idx.longest_prefix(["a", "b", "c", "d"], "p1", alive) == ({"d0"}, 4)
    assert idx.longest_prefix(["a", "b", "c", "x"], "p1", {"p0", "p1"}) == ({"p0"}, 3)
    assert idx.longest_prefix(["x", "a"], "p1", alive) == (set(), 0)
    idx.kv_event("d0", [], ["c"])  # a hole: the run stops there
    assert idx.longest_prefix(["a", "b", "c", "d"], "p1", alive) == ({"p0"}, 3)
    idx.forget_worker("p0")
    assert idx.longest_prefix(["a", "b", "c"], "p1", alive) == ({"d0"}, 2)
    assert "p0" not in idx.kv_of and "p0" not in idx.kv["a"]


def test_index_embeddings_by_alias():
    idx = ClusterIndex(max_aliases=2)
    ref = ImageRef("pix1", 5, None, {"zmq": "tcp://x"})
    assert idx.embedding_for("bytes1", {"e0"}) is None
    idx.learn_alias("bytes1", "pix1")
    idx.learn_alias("bytes1-reencoded", "pix1")  # same pixels, other file bytes
    idx.embedding_stored("e0", ref)
    assert idx.embedding_for("bytes1", {"e0"}) == ref
    assert idx.embedding_for("bytes1-reencoded", {"e0"}) == ref
    assert idx.embedding_for("bytes1", {"e1"}) is None  # its holder is not alive
    idx.embedding_evicted("e0", "pix1")
    assert idx.embedding_for("bytes1", {"e0"}) is None
    idx.learn_alias("bytes2", "pix2")  # bounded: the oldest alias goes
    assert len(idx.aliases) == 2
