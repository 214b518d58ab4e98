"""The prefix cache registers each full block once, as it fills, and again after a free."""

from __future__ import annotations

from stages.engine.block_manager import BlockManager
from stages.engine.sampling_params import SamplingParams
from stages.engine.sequence import Sequence


def _run(bm: BlockManager, seq: Sequence, upto: int) -> None:
    """Compute ``seq`` one token per step up to ``upto`` tokens, registering after each step."""
    while seq.num_computed_tokens < upto:
        if seq.num_computed_tokens >= seq.num_tokens:
            seq.output_token_ids.append(900 + seq.num_computed_tokens)
        assert bm.allocate(seq, 1)
        seq.num_computed_tokens += 1
        bm.cache_full_blocks(seq)


def test_blocks_register_as_they_fill_and_again_after_free():
    bm = BlockManager(num_blocks=16, block_size=4, enable_caching=True)
    seq = Sequence("a", list(range(10, 20)), SamplingParams(), max_tokens=32)
    for n in range(1, 19):
        _run(bm, seq, n)
        assert len(bm.cached) == n // 4  # a block enters the cache the step it fills, never twice
        assert seq.num_registered_blocks == n // 4
    assert sorted(bm.cached.values()) == seq.block_table[:4]
    bm.free(seq)  # like a preemption: the same sequence will be recomputed into new blocks
    assert seq.num_registered_blocks == 0
    bm.reset_prefix_cache()  # its old blocks are evicted: nothing to hit
    assert not bm.cached
    seq.num_computed_tokens = 0
    _run(bm, seq, 12)
    assert len(bm.cached) == 3 and sorted(bm.cached.values()) == sorted(seq.block_table[:3])
    other = Sequence("b", list(range(10, 20)) + seq.output_token_ids[:4], SamplingParams(), max_tokens=4)
    assert bm.match_prefix(other) == 12
