"""A request's sampler in the llama_cpp engine: llama.cpp's sampler chain, or the same draw in numpy.

Most requests ask for a temperature and nothing else, or a ``logit_bias`` beside it
(OpenAI's defaults leave top_p at 1 and have no top_k, min_p or penalties). For those,
:class:`VocabularyDraw` computes what llama.cpp's ``logit_bias``, ``temp`` and ``dist``
(or ``greedy``) samplers compute, in a few vector passes over the row of logits.
``llama_sampler_sample`` builds a candidate array of the whole vocabulary (49152 entries)
and walks it once per sampler. Where sampling runs, on the compute thread right after a
decode, the draw takes 290-320 µs a token here and the chain 470 (``bench/experiments/step_costs.py``);
every batched sequence waits for it.

Anything more (top_k, top_p, min_p, penalties, a grammar) runs llama.cpp's own chain,
:class:`ChainSampler`. Either way the same seed draws the same tokens, from the
context's logits or from a row kept with a cached prompt.
"""

from __future__ import annotations

import ctypes
import random
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from itertools import accumulate
from typing import Any, Protocol

import numpy as np

from tokenwire.v1 import worker_pb2

# llama_token_data, for running a chain on logits kept aside.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
# Entries summed together before the draw walks one block entry by entry.
_BLOCK = 256


class Sampler(Protocol):
    def sample_row(self, ctx: Any, row: int) -> int:
        """Sample from row ``row`` of the context's last logits, and accept the token."""

    def sample(self, logits: np.ndarray) -> int:
        """The same, from a row of logits kept aside."""

    def close(self) -> None: ...


def _opt(sampling: worker_pb2.SamplingParams, name: str, default: float) -> float:
    return getattr(sampling, name) if sampling.HasField(name) else default  # type: ignore[arg-type]


def _penalties(sampling: worker_pb2.SamplingParams) -> tuple[float, float, float]:
    return (
        _opt(sampling, "repetition_penalty", 1.0),
        _opt(sampling, "frequency_penalty", 0.0),
        _opt(sampling, "presence_penalty", 0.0),
    )


def _bias(sampling: worker_pb2.SamplingParams) -> dict[int, float]:
    return {int(k): float(v) for k, v in sampling.logit_bias.items()}


def _seed(sampling: worker_pb2.SamplingParams) -> int | None:
    return int(sampling.seed) if sampling.HasField("seed") else None


# The fields the draw honours, and those no sampler reads (the engine's loop does).
_DRAW_FIELDS = {"temperature", "logit_bias", "seed", "max_tokens", "stop"}
# The chain's other fields: the values at which they do nothing, so llama_chain adds no
# sampler for them and the draw may take the request (top_k -1 is vLLM's "off", 0 OpenAI-style clients').
_NO_OP: dict[str, Callable[[float], bool]] = {
    "top_p": lambda v: v >= 1.0,
    "top_k": lambda v: v <= 0,
    "min_p": lambda v: v <= 0.0,
    "presence_penalty": lambda v: v == 0.0,
    "frequency_penalty": lambda v: v == 0.0,
    "repetition_penalty": lambda v: v == 1.0,
}


def _acts(sampling: worker_pb2.SamplingParams, name: str) -> bool:
    """Whether the request sets chain field ``name`` to a value at which it does something."""
    return sampling.HasField(name) and not _NO_OP[name](getattr(sampling, name))  # type: ignore[arg-type]


def make_sampler(sampling: worker_pb2.SamplingParams, grammar: Any, model: Any, n_vocab: int, n_ctx: int) -> Sampler:
    """This request's sampler: the numpy draw unless it asks for something only the chain does.

    A field added to ``SamplingParams`` later goes to the chain until the draw learns it.
    """
    needs_chain = grammar is not None or any(
        field.name not in _DRAW_FIELDS and not _NO_OP.get(field.name, lambda _: False)(value)
        for field, value in sampling.ListFields()
    )
    if needs_chain:
        return llama_chain(sampling, grammar, model, n_vocab, n_ctx)
    return VocabularyDraw(n_vocab, _opt(sampling, "temperature", 1.0), _bias(sampling), _seed(sampling))


def llama_chain(
    sampling: worker_pb2.SamplingParams, grammar: Any, model: Any, n_vocab: int, n_ctx: int
) -> ChainSampler:
    """llama.cpp's sampler chain for every field of the request."""
    from llama_cpp import _internals
    from llama_cpp import llama_cpp as C

    chain = _internals.LlamaSampler()
    bias = _bias(sampling)
    if bias:
        chain.add_logit_bias(n_vocab, bias)
    if any(_acts(sampling, name) for name in ("repetition_penalty", "frequency_penalty", "presence_penalty")):
        # Over the generated tokens (the sampler only sees what it accepts).
        chain.add_penalties(n_vocab, n_ctx, *_penalties(sampling))
    if grammar is not None:
        chain.add_grammar(model, grammar)
    temperature = _opt(sampling, "temperature", 1.0)
    if temperature <= 0:
        chain.add_greedy()
        return ChainSampler(chain)
    # OpenAI's order: temperature first, then the truncations.
    chain.add_temp(temperature)
    if _acts(sampling, "top_k"):
        chain.add_top_k(int(sampling.top_k))
    if _acts(sampling, "top_p"):
        chain.add_top_p(sampling.top_p, 1)
    if _acts(sampling, "min_p"):
        chain.add_min_p(sampling.min_p, 1)
    # llama.cpp's seed is 32-bit and 0xFFFFFFFF means "random".
    seed = _seed(sampling)
    chain.add_dist(C.LLAMA_DEFAULT_SEED if seed is None else seed % 0xFFFFFFFF)
    return ChainSampler(chain)


class ChainSampler:
    """llama.cpp's sampler chain (a ``llama_cpp._internals.LlamaSampler``)."""

    def __init__(self, chain: Any) -> None:
        from llama_cpp import llama_cpp as C

        self._C = C
        self._chain = chain

    def sample_row(self, ctx: Any, row: int) -> int:
        return int(self._C.llama_sampler_sample(self._chain.sampler, ctx, row))

    def sample(self, logits: np.ndarray) -> int:
        """What ``llama_sampler_sample`` does with a row of the context."""
        C = self._C
        cur = np.zeros(logits.size, dtype=_TOKEN_DATA)
        cur["id"] = np.arange(logits.size, dtype=np.int32)
        cur["logit"] = logits
        array = C.llama_token_data_array(
            data=cur.ctypes.data_as(C.llama_token_data_p), size=logits.size, selected=-1, sorted=False
        )
        C.llama_sampler_apply(self._chain.sampler, ctypes.byref(array))
        token = int(array.data[array.selected].id)  # a sampler may point data elsewhere
        C.llama_sampler_accept(self._chain.sampler, token)
        return token

    def close(self) -> None:
        self._chain.close()


class VocabularyDraw:
    """``logit_bias``, then ``temperature``, then a draw over the whole vocabulary (greedy at 0).

    The weights are ``exp(l - max)`` of the biased, scaled logits, as llama.cpp's ``dist``
    computes them; the token is the first whose running sum exceeds ``u * sum`` for a
    uniform ``u`` in [0, 1), found block by block. Bias for a token outside the vocabulary
    is ignored, as llama.cpp does.

    It runs right after a decode has streamed the weights through the caches, where each
    numpy call costs several times what it costs in a loop: so the weights go into one
    scratch array made once, and the two short walks (over block sums, then one block) are
    plain Python over floats.
    """

    def __init__(self, n_vocab: int, temperature: float, bias: dict[int, float], seed: int | None) -> None:
        from llama_cpp import llama_cpp as C

        self._C = C
        self._n_vocab = n_vocab
        self._temperature = np.float32(temperature)
        known = {token: value for token, value in bias.items() if 0 <= token < n_vocab}
        self._bias_ids = np.fromiter(known, dtype=np.intp, count=len(known))
        self._bias = np.fromiter(known.values(), dtype=np.float32, count=len(known))
        # None: fresh entropy. OpenAI's seed is any int64; taken modulo 2**64, -1 and 1 differ.
        self._rng = random.Random(None if seed is None else seed % 2**64)
        # The weights, one block a row; the last row's tail past the vocabulary stays 0.
        self._blocks = np.zeros((-(-n_vocab // _BLOCK), _BLOCK), dtype=np.float32)
        self._x = self._blocks.reshape(-1)[:n_vocab]

    def sample_row(self, ctx: Any, row: int) -> int:
        logits = np.ctypeslib.as_array(self._C.llama_get_logits_ith(ctx, row), shape=(self._n_vocab,))
        return self.sample(logits)

    def sample(self, logits: np.ndarray) -> int:
        x, ids = self._x, self._bias_ids
        if self._temperature <= 0:  # the first of equal maxima, as llama.cpp's greedy
            if not ids.size:
                return int(np.argmax(logits))
            np.copyto(x, logits)
            x[ids] += self._bias
            return int(np.argmax(x))
        np.divide(logits, self._temperature, out=x)
        if ids.size:  # llama.cpp's order: the bias, then the temperature
            x[ids] = (logits[ids] + self._bias) / self._temperature
        np.subtract(x, x.max(), out=x)
        np.exp(x, out=x)
        return self._draw()

    def _draw(self) -> int:
        sums = list(accumulate(self._blocks.sum(axis=1).tolist()))
        target = self._rng.random() * sums[-1]  # the largest weight is exp(0): the sum is >= 1
        # The first block whose running sum exceeds the target: its own sum is > 0.
        b = bisect_right(sums, target)
        if b >= len(sums):  # past the end by rounding: the last block that can be drawn
            b = bisect_left(sums, sums[-1])
        block = self._blocks[b]
        running = list(accumulate(block.tolist(), initial=sums[b - 1] if b else 0.0))
        i = bisect_right(running, target) - 1
        if i >= _BLOCK or block[i] == 0:  # past the end by rounding: its last token that can be drawn
            i = int(np.flatnonzero(block)[-1])
        return b * _BLOCK + i

    def close(self) -> None:
        pass
