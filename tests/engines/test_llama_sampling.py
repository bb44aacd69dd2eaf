"""The llama_cpp engine's samplers: the numpy draw against llama.cpp's own chain.

These are arithmetic on rows of logits, so they use made-up rows (a vocabulary of the
model's size, SmolLM2's 49152), not a model; the engine tests run both samplers on the
real model.
"""

from __future__ import annotations

import numpy as np
import pytest

from tokenwire.v1 import worker_pb2
from workers.engines.llama_cpp.sampling import ChainSampler, VocabularyDraw, llama_chain, make_sampler

VOCAB = 49152
DRAWS = 10_000
# Binomial standard error at p=0.5 over 10k draws is 0.005: 0.025 is five of them.
TOLERANCE = 0.025


def _logits(seed: int = 0) -> np.ndarray:
    """A peaked row like a model's: a few likely tokens over a long tail."""
    rng = np.random.default_rng(seed)
    row = rng.standard_normal(VOCAB).astype(np.float32) * 2
    row[[11, 500, 7000, 49151]] = [14, 13, 12.5, 12]
    return row


def _frequencies(sampler: object, logits: np.ndarray, draws: int = DRAWS) -> np.ndarray:
    counts = np.bincount([sampler.sample(logits) for _ in range(draws)], minlength=VOCAB)  # type: ignore[attr-defined]
    return counts / draws


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    return p / p.sum()


def _sampling(**fields: object) -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(**fields)  # type: ignore[arg-type]


def _chain(**fields: object) -> ChainSampler:
    """llama.cpp's own chain for these fields: the reference."""
    return llama_chain(_sampling(**fields), None, None, VOCAB, 8192)


def test_plain_requests_get_the_numpy_draw_and_the_rest_the_chain() -> None:
    assert isinstance(make_sampler(_sampling(), None, None, VOCAB, 8192), VocabularyDraw)
    assert isinstance(make_sampler(_sampling(temperature=0.7, seed=3), None, None, VOCAB, 8192), VocabularyDraw)
    assert isinstance(
        make_sampler(_sampling(temperature=0.0, logit_bias={5: 1.0}), None, None, VOCAB, 8192), VocabularyDraw
    )
    assert isinstance(make_sampler(_sampling(top_p=1.0, top_k=0, min_p=0.0), None, None, VOCAB, 8192), VocabularyDraw)
    neutral = _sampling(max_tokens=5, stop=["x"], presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)
    assert isinstance(make_sampler(neutral, None, None, VOCAB, 8192), VocabularyDraw)
    assert isinstance(make_sampler(_sampling(top_k=-1), None, None, VOCAB, 8192), VocabularyDraw)  # vLLM's "off"
    for fields in (
        {"top_p": 0.9},
        {"top_k": 40},
        {"min_p": 0.05},
        {"frequency_penalty": 0.5},
        {"repetition_penalty": 1.1},
    ):
        assert isinstance(make_sampler(_sampling(**fields), None, None, VOCAB, 8192), ChainSampler), fields


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_the_draw_follows_the_softmax_as_the_chain_does(temperature: float) -> None:
    logits = _logits()
    expected = _softmax(logits, temperature)
    ours = _frequencies(VocabularyDraw(VOCAB, temperature, {}, seed=1), logits)
    theirs = _frequencies(_chain(temperature=temperature, seed=1), logits)
    likely = np.argsort(-expected)[:6]
    assert np.abs(ours[likely] - expected[likely]).max() < TOLERANCE
    assert np.abs(theirs[likely] - expected[likely]).max() < TOLERANCE
    # The tail too: the mass outside the likely tokens.
    tail = 1 - expected[likely].sum()
    assert abs((1 - ours[likely].sum()) - tail) < TOLERANCE


def test_logit_bias_bans_and_favours_tokens_as_the_chain_does() -> None:
    logits = _logits()
    bias = {11: -100.0, 7000: 3.0, VOCAB + 5: 50.0, -1: 50.0}  # outside the vocabulary: ignored
    ours = _frequencies(VocabularyDraw(VOCAB, 0.7, bias, seed=2), logits)
    theirs = _frequencies(_chain(temperature=0.7, seed=2, logit_bias={11: -100.0, 7000: 3.0}), logits)
    biased = logits.copy()
    biased[11] -= 100
    biased[7000] += 3
    expected = _softmax(biased, 0.7)
    assert ours[11] == 0 and theirs[11] == 0
    assert abs(ours[7000] - expected[7000]) < TOLERANCE and abs(theirs[7000] - expected[7000]) < TOLERANCE
    assert expected[7000] > 0.9


def test_greedy_takes_the_biased_maximum_and_the_first_of_equals() -> None:
    logits = _logits()
    assert VocabularyDraw(VOCAB, 0.0, {}, seed=None).sample(logits) == 11
    assert VocabularyDraw(VOCAB, 0.0, {11: -100.0}, seed=None).sample(logits) == 500
    ties = np.zeros(VOCAB, dtype=np.float32)
    ties[[40, 41, 9000]] = 5.0
    assert VocabularyDraw(VOCAB, 0.0, {}, seed=None).sample(ties) == 40
    assert _chain(temperature=0.0).sample(ties) == 40


def test_the_same_seed_draws_the_same_tokens_negative_seeds_too() -> None:
    logits = _logits()
    flat = np.zeros(VOCAB, dtype=np.float32)  # every token equally likely: seeds must differ

    def tokens(seed: int) -> list[int]:
        draw = VocabularyDraw(VOCAB, 1.0, {}, seed=seed)  # one stream of 40 draws
        return [draw.sample(row) for row in (logits, flat) * 20]

    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)
    assert tokens(-3) == tokens(-3)
    assert len(set(tokens(-3)[1::2])) > 15  # the flat rows: the stream moves on


def test_the_draw_never_returns_a_token_it_cannot_draw() -> None:
    """Weights that underflow to 0 (a banned token's) are never drawn, even at a block's edge."""
    logits = np.full(VOCAB, -200.0, dtype=np.float32)
    allowed = [255, 256, 49151]  # the last of a block, the first of the next, the very last
    logits[allowed] = 0.0
    draw = VocabularyDraw(VOCAB, 1.0, {}, seed=5)
    drawn = {draw.sample(logits) for _ in range(3000)}
    assert drawn == set(allowed)
    odd = VOCAB - 1000  # a vocabulary that is not a whole number of blocks
    draw = VocabularyDraw(odd, 1.0, {}, seed=5)
    row = np.full(odd, -200.0, dtype=np.float32)
    row[odd - 1] = 0.0
    assert {draw.sample(row) for _ in range(100)} == {odd - 1}


class _TopOfTheRange:
    """u = 1: what rounding can make of u * sum at the very top of [0, 1)."""

    def random(self) -> float:
        return 1.0


def test_a_target_past_the_last_weight_takes_the_last_token_that_can_be_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    draw = VocabularyDraw(VOCAB, 1.0, {}, seed=5)
    monkeypatch.setattr(draw, "_rng", _TopOfTheRange())
    row = np.full(VOCAB, -200.0, dtype=np.float32)  # every later block underflows to 0
    row[[300, 400]] = 0.0
    assert draw.sample(row) == 400
