import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                          TopPLogitsWarper)

from stages.engine.sampler import (Sampler, SampleRequest, apply_min_p, apply_penalties,
                                   apply_top_k, apply_top_k_top_p, make_generator)
from stages.engine.sampling_params import SamplingParams

V = 512
EOS = 3


def row(prompt=(1, 2), output=(), **params) -> SampleRequest:
    p = SamplingParams(**params)
    return SampleRequest(p, list(prompt), list(output), make_generator(p, "cpu"))


def random_logits(batch: int, seed: int, vocab: int = V, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_logprobs_are_raw_log_softmax_with_top_ids_and_rank():
    logits = random_logits(4, 0)
    before = logits.clone()
    rows = [row(temperature=0, logprobs=5), row(seed=1, logprobs=0, repetition_penalty=1.5),
            row(seed=2), row(top_k=10, temperature=0.5, presence_penalty=1.0, output=[7], logprobs=20)]
    result = Sampler({EOS})(logits, rows)
    assert torch.equal(logits, before)  # the input is never modified
    reference = torch.log_softmax(logits.float(), -1)
    assert result.logprobs[2] is None
    for i in (0, 1, 3):
        lp, token = result.logprobs[i], result.token_ids[i]
        n = rows[i].params.logprobs
        assert abs(lp.sampled_logprob - reference[i, token].item()) <= 1e-6
        assert lp.sampled_rank == int((reference[i] > reference[i, token]).sum()) + 1
        values, ids = reference[i].topk(n) if n else (reference[i, :0], reference[i, :0])
        assert lp.top_ids == ids.tolist()
        assert torch.allclose(torch.tensor(lp.top_logprobs), values, atol=1e-6, rtol=0)
    assert result.logprobs[0].sampled_rank == 1  # greedy without penalties takes the top id


def test_greedy_is_argmax_with_lowest_index_on_ties():
    logits = random_logits(6, 1)
    logits[2, 10] = logits[2, 20] = logits[2].max() + 1
    rows = [row(temperature=0) for _ in range(6)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()
    assert Sampler()(logits, rows).token_ids[2] == 10
    # Same answer off the fast path (greedy rows mixed with a sampled row and logprobs).
    rows[5] = row(seed=0, logprobs=1)
    assert Sampler()(logits, rows).token_ids[:5] == logits.argmax(-1).tolist()[:5]


def test_repetition_penalty_matches_transformers():
    sampler = Sampler()
    for seed in range(20):
        logits = random_logits(3, seed, scale=1.0)
        ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(seed))
        rows = [row(prompt=ids[i, :7].tolist(), output=ids[i, 7:].tolist(), temperature=0,
                    repetition_penalty=1.0 + 0.4 * i) for i in range(3)]
        for i in range(3):
            # Make the most likely id a repeated one so the penalty matters.
            logits[i, ids[i, 0]] = logits[i].max() + 0.05
            expected = RepetitionPenaltyLogitsProcessor(1.0 + 0.4 * i)(ids[i:i + 1], logits[i:i + 1].clone())
            penalised = logits[i:i + 1].clone()
            apply_penalties(penalised, rows[i:i + 1])
            assert torch.equal(penalised, expected)
            assert sampler(logits, rows).token_ids[i] == int(expected.argmax())


def test_frequency_and_presence_penalties_follow_vllm():
    logits = random_logits(2, 3)
    output = [5, 5, 5, 9, 600]  # 600 >= V: a padded-vocab id, ignored
    rows = [row(output=output, frequency_penalty=0.5, presence_penalty=1.5),
            row(output=output, frequency_penalty=-0.25)]
    penalised = logits.clone()
    apply_penalties(penalised, rows)
    count = torch.zeros(V)
    count[5], count[9] = 3, 1
    for i, (freq, pres) in enumerate([(0.5, 1.5), (-0.25, 0.0)]):
        expected = logits[i] - (freq * count + pres * (count > 0))
        assert torch.allclose(penalised[i], expected, atol=1e-6, rtol=0)
    # Prompt ids do not count for frequency/presence.
    untouched = logits[:1].clone()
    apply_penalties(untouched, [row(prompt=[5, 9], presence_penalty=2.0)])
    assert torch.equal(untouched, logits[:1])


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.zeros(1, V)
    logits[0, EOS], logits[0, 7], logits[0, 11] = 10.0, 9.0, 8.0
    sampler = Sampler({EOS})
    assert sampler(logits, [row(output=[1], temperature=0, min_tokens=3, stop_token_ids=[7])]).token_ids == [11]
    assert sampler(logits, [row(output=[1, 1, 1], temperature=0, min_tokens=3)]).token_ids == [EOS]
    batch = logits.expand(300, V)
    sampled = sampler(batch, [row(output=[], min_tokens=1, temperature=2.0) for _ in range(300)]).token_ids
    assert EOS not in sampled


@pytest.mark.parametrize("top_k", [1, 5, 50, V + 10])
def test_top_k_matches_transformers(top_k):
    logits = random_logits(8, top_k)
    logits[0, 100:104] = logits[0].max() + 1  # ties at the threshold are kept by both
    expected = TopKLogitsWarper(min(top_k, V))(None, logits.clone())
    assert torch.equal(apply_top_k(logits.clone(), [top_k] * 8).isfinite(), expected.isfinite())
    both = apply_top_k_top_p(logits.clone(), [top_k] * 8, [1.0] * 8)
    assert torch.equal(both.isfinite(), expected.isfinite())


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.9, 0.999, 1.0])
def test_top_p_matches_transformers(top_p):
    logits = random_logits(8, 7)
    expected = TopPLogitsWarper(top_p)(None, logits.clone())
    ours = apply_top_k_top_p(logits.clone(), [0] * 8, [top_p] * 8)
    assert torch.equal(ours.isfinite(), expected.isfinite())
    assert torch.equal(ours[ours.isfinite()], logits[ours.isfinite()])


def test_top_k_then_top_p_matches_transformers_chain():
    logits = random_logits(8, 8, scale=1.0)
    expected = TopPLogitsWarper(0.6)(None, TopKLogitsWarper(30)(None, logits.clone()))
    ours = apply_top_k_top_p(logits.clone(), [30] * 8, [0.6] * 8)
    assert torch.equal(ours.isfinite(), expected.isfinite())


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.2, 0.9, 1.0])
def test_min_p_matches_transformers(min_p):
    logits = random_logits(8, 9)
    expected = MinPLogitsWarper(min_p)(None, logits.clone())
    assert torch.equal(apply_min_p(logits.clone(), [min_p] * 8).isfinite(), expected.isfinite())


def test_sampled_tokens_stay_inside_the_filtered_set():
    logits = random_logits(1, 10, scale=0.5).expand(200, V)
    rows = [row(top_k=4) for _ in range(100)] + [row(top_p=0.2, seed=i) for i in range(100)]
    tokens = Sampler()(logits, rows).token_ids
    assert set(tokens[:100]) <= set(logits[0].topk(4).indices.tolist())
    nucleus = TopPLogitsWarper(0.2)(None, logits[:1].clone()).isfinite()[0]
    assert all(nucleus[t] for t in tokens[100:])


def _run(steps: int, position: int, batch_rows) -> list[int]:
    """Tokens drawn for the tracked row at `position`, whose logits depend only on the step."""
    sampler, tokens = Sampler(), []
    for step in range(steps):
        logits = random_logits(len(batch_rows), 1000 + step, scale=1.0)
        logits[position] = random_logits(1, step, scale=1.0)[0]
        tokens.append(sampler(logits, batch_rows).token_ids[position])
    return tokens


def test_seeded_rows_are_reproducible_across_batch_compositions():
    def tracked(seed):
        return row(seed=seed, temperature=0.8, top_p=0.95, top_k=100)

    alone = _run(20, 0, [tracked(42)])
    others = [row(), row(seed=7, min_p=0.1), row(temperature=0), row(seed=3, top_k=5),
              row(top_p=0.5, repetition_penalty=1.2)]
    for position in (0, 2, 5):
        batch = others[:position] + [tracked(42)] + others[position:]
        assert _run(20, position, batch) == alone
    assert _run(20, 0, [tracked(43)]) != alone
    assert len(set(alone)) > 5  # a real draw, not a constant


def _chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    observed = torch.bincount(torch.tensor(tokens), minlength=len(probs)).double()
    expected = probs.double() * len(tokens)
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("seeded", [False, True])
def test_draws_follow_the_tempered_distribution(seeded):
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5])
    n = 4000
    torch.manual_seed(0)
    rows = [row(temperature=0.7, seed=i if seeded else None) for i in range(n)]
    tokens = Sampler()(base.expand(n, -1), rows).token_ids
    # 7 degrees of freedom: P(chi2 > 24.3) = 0.001; fixed seeds make this deterministic.
    assert _chi_square(tokens, torch.softmax(base / 0.7, -1)) < 24.3


def test_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="do not match"):
        Sampler()(torch.zeros(2, V), [row()])
