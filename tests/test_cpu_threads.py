"""The engine runs small CPU steps on one thread and large ones on all (stages/engine/cpu_threads.py)."""

from __future__ import annotations

import torch

from stages.engine import SamplingParams
from stages.engine.cpu_threads import StepThreads, step_flops
from tests.conftest import TEST_DEVICE, make_llm


def test_step_threads_picks_and_restores():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = StepThreads(torch.device("cpu"), min_flops=1e6)
        with threads.run(1e3):
            assert torch.get_num_threads() == 1
            with threads.run(1e9):  # a large encode inside a small step gets every thread
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads.run(1e9):
            assert torch.get_num_threads() == 2
        assert StepThreads(torch.device("meta"), 1e6).max_threads == 1
    finally:
        torch.set_num_threads(before)


def test_step_flops_counts_weights_and_attention():
    # 2 tokens x 2 x 10 params, plus 4 x width 3 x 2 layers x (1 x 5 + 1 x 7) context.
    assert step_flops(10, 3, 2, [1, 1], [5, 7]) == 40 + 4 * 3 * 2 * 12


def _threads_seen(llm) -> list[int]:
    seen: list[int] = []
    llm.engine.runner.model.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    return seen


def test_engine_steps_use_one_thread_when_small(tiny_models):
    if TEST_DEVICE != "cpu":
        return
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        d = tiny_models("llama")
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        small, always = make_llm(d, num_kv_blocks=64), make_llm(d, num_kv_blocks=64, cpu_parallel_min_gflop=0)
        seen_small, seen_always = _threads_seen(small), _threads_seen(always)
        a = small.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids
        b = always.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids
        assert seen_small and set(seen_small) == {1}
        assert seen_always and set(seen_always) == {2}
        assert a == b
        assert torch.get_num_threads() == 2  # what the caller set is left in force
    finally:
        torch.set_num_threads(before)
