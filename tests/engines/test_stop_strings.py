"""Stop strings, as the llama_cpp and echo engines cut their text (workers/engines/stop_strings.py).

The end-to-end tests run on echo, so they go through this code too.
"""

from __future__ import annotations

from tokenwire.v1 import common_pb2, worker_pb2
from workers.engine import Delta, Generation
from workers.engines.echo import EchoEngine
from workers.engines.stop_strings import ChoiceText, StopBuffer


def test_stop_buffer_holds_back_prefixes() -> None:
    buf = StopBuffer(["</end>", "xyz"])
    assert buf.push("hello <") == ("hello ", False)
    assert buf.push("/en") == ("", False)
    assert buf.push("ding") == ("</ending", False)
    assert buf.push("ab x") == ("ab ", False)
    assert buf.push("yz tail") == ("", True)
    buf = StopBuffer([])
    assert buf.push("a") == ("a", False) and buf.flush() == ""


def test_held_back_text_keeps_its_tokens_and_counts_them_once() -> None:
    text = ChoiceText(["!?"])
    assert text.token("Hi", 1) == ([Delta(text="Hi", token_ids=[1], tokens=1)], False)
    assert text.token(" there!", 2) == ([Delta(text=" there", token_ids=[2], tokens=1)], False)
    # "!" may start the stop string: it comes at the end, after its token was counted.
    assert text.end("length") == [Delta(text="!", finish_reason="length", tokens=0)]


async def echo(prompt: str, stop: list[str], tokens: int = 6) -> list[Delta]:
    engine = EchoEngine("m", tokens=tokens)
    request = worker_pb2.GenerateRequest(
        prompt=common_pb2.TextOrTokens(text=prompt), sampling=worker_pb2.SamplingParams(stop=stop)
    )
    prepared = await engine.prepare(request)
    return [d async for ds in engine.generate(request, prepared, tokens, Generation()) for d in ds]


async def test_echo_cuts_a_stop_string_that_spans_tokens() -> None:
    # "alpha beta gamma ...": the stop string starts in "beta" and ends in "gamma";
    # no part of it goes out, though "alpha" and "beta" each end like its start.
    deltas = await echo("alpha beta gamma delta", ["a gam", "never"])
    assert "".join(d.text for d in deltas) == "alpha bet"
    assert deltas[-1].finish_reason == "stop"
    assert sum(d.token_count for d in deltas) == 3  # the words up to the one that completes it


async def test_echo_without_stop_strings_sends_every_word_as_it_comes() -> None:
    deltas = await echo("alpha beta", [], tokens=3)
    assert [d.text for d in deltas] == ["alpha", " beta", " alpha", ""]
    assert deltas[-1].finish_reason == "length" and sum(d.token_count for d in deltas) == 3
