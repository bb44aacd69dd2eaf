"""Cache-aware routing through real processes (echo workers; tests/test_routing_models.py has the
real model's cache): affinity, the load margin, prompt_cache_key and previous_response_id, a
departed worker, and two gateways that share no state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import openai
import pytest

from tests import harness
from tests.conftest import API_KEY, CHAT_MODEL, EchoSystem, start_echo_system, stop_system
from tokenwire.v1 import api_pb2, api_pb2_grpc, common_pb2

AUTH = (("authorization", f"Bearer {API_KEY}"),)
SYSTEM = {"role": "system", "content": "You answer briefly. " * 20}


@pytest.fixture
def system() -> Iterator[EchoSystem]:
    # Three workers, each test its own (they stop workers and count requests); streams that
    # run long unless max_tokens stops them (20 ms a token), so that one can be held open.
    system = start_echo_system(
        chat_workers=3, delay=0.02, tokens=2000, context=4096, gateway_args=("--metrics-port", "0")
    )
    yield system
    stop_system(system)


def served(system: EchoSystem) -> list[int]:
    """Requests each worker has served (-1: stopped)."""
    return [harness.worker_stats(w.address).requests_total if w.alive() else -1 for w in system.chat_workers]


def landed(system: EchoSystem, before: list[int]) -> list[int]:
    """Indexes of the workers that served requests since ``before``."""
    return [i for i, (a, b) in enumerate(zip(before, served(system), strict=True)) if b > a]


def client(system: EchoSystem) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{system.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def gateway_metrics(system: EchoSystem) -> dict[str, float]:
    return harness.scrape(f"http://{system.gateway.metrics_address}/metrics")


def decisions(system: EchoSystem, reason: str) -> float:
    """Routing decisions for a reason, over every worker."""
    prefix = f'tokenwire_routing_decisions_total{{model="{CHAT_MODEL}",reason="{reason}",'
    return sum(v for k, v in gateway_metrics(system).items() if k.startswith(prefix))


def conversation(
    client: openai.OpenAI, first: str, turns: int, system: dict[str, str] = SYSTEM, **extra: Any
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [system, {"role": "user", "content": first}]
    for turn in range(turns):
        reply = client.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=4, **extra)  # type: ignore[arg-type]
        messages += [{"role": "assistant", "content": reply.choices[0].message.content}]
        messages += [{"role": "user", "content": f"and then, {turn}?"}]
    return messages


def test_a_conversations_turns_land_on_one_worker(system: EchoSystem) -> None:
    sdk = client(system)
    homes = set()
    for tenant in range(6):
        before = served(system)
        conversation(sdk, "hello", 4, system={"role": "system", "content": f"Tenant {tenant}'s assistant."})
        where = landed(system, before)
        assert len(where) == 1, where
        homes |= set(where)
    assert len(homes) >= 2  # tenants spread over the workers
    assert (decisions(system, "prefix"), decisions(system, "anchor")) == (18, 6)
    assert "route=" in system.gateway.log() and ":prefix:" in system.gateway.log()


def test_a_busy_worker_loses_its_affinity_past_the_margin(system: EchoSystem) -> None:
    sdk = client(system)
    messages = conversation(sdk, "busy", 1)
    before = served(system)
    conversation(sdk, "busy", 1)  # the same first turn again: its home
    (home,) = landed(system, before)
    # Hold five long streams of this conversation on its home: five calls more than the idle
    # workers, past the default margin (4 calls, and 1.5 times).
    streams = [
        sdk.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=2000, stream=True)  # type: ignore[call-overload]
        for _ in range(5)
    ]
    try:
        for stream in streams:
            next(iter(stream))
        harness.wait_until(lambda: harness.worker_stats(system.chat_workers[home].address).in_flight == 5)
        before = served(system)
        sdk.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
        assert landed(system, before) != [home]
        assert decisions(system, "load") >= 1
    finally:
        for stream in streams:
            stream.close()


def test_prompt_cache_key_pins_conversations_on_all_three_apis(system: EchoSystem) -> None:
    sdk = client(system)
    before = served(system)
    key = {"prompt_cache_key": "tenant-42"}
    for i in range(4):
        sdk.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=2, extra_body=key
        )
        sdk.completions.create(model=CHAT_MODEL, prompt=f"prompt {i}", max_tokens=2, extra_body=key)
        sdk.responses.create(model=CHAT_MODEL, input=f"input {i}", max_output_tokens=2, extra_body=key)
    assert len(landed(system, before)) == 1


def test_previous_response_id_chains_stay_on_one_worker(system: EchoSystem) -> None:
    sdk = client(system)
    homes = set()
    for chain in range(4):
        before = served(system)
        reply = sdk.responses.create(model=CHAT_MODEL, input=f"chain {chain}", max_output_tokens=3)
        for turn in range(3):
            reply = sdk.responses.create(
                model=CHAT_MODEL, input=f"turn {turn}", previous_response_id=reply.id, max_output_tokens=3
            )
        where = landed(system, before)
        assert len(where) == 1, where
        homes |= set(where)
    # The key a chain's first turn gave carries over to its later turns.
    keyed = sdk.responses.create(model=CHAT_MODEL, input="x", extra_body={"prompt_cache_key": "k"}, max_output_tokens=2)
    later = sdk.responses.create(model=CHAT_MODEL, input="y", previous_response_id=keyed.id, max_output_tokens=2)
    assert later.to_dict()["prompt_cache_key"] == "k"


def test_a_departed_worker_leaves_the_index(system: EchoSystem) -> None:
    sdk = client(system)
    before = served(system)
    conversation(sdk, "soon gone", 2)
    (home,) = landed(system, before)
    entries = "tokenwire_routing_index_entries"
    assert gateway_metrics(system)[entries] > 0
    system.chat_workers[home].stop()  # deregisters: the gateway's pool drops it at once
    harness.wait_until(lambda: gateway_metrics(system)[entries] == 0, what="the index to forget the worker")
    # The conversation goes on elsewhere.
    before = served(system)
    conversation(sdk, "soon gone", 2)
    assert home not in landed(system, before)


def test_least_loaded_routing_is_a_flag_away() -> None:
    system = start_echo_system(
        chat_workers=2, context=4096, gateway_args=("--routing", "least-loaded", "--metrics-port", "0")
    )
    try:
        conversation(client(system), "anywhere", 3)
        assert not any(k.startswith("tokenwire_routing_decisions_total{") for k in gateway_metrics(system))
    finally:
        stop_system(system)


def test_two_gateways_that_share_no_state_but_see_the_same_conversations_agree() -> None:
    """Turns alternate between the gateways, so each has seen every conversation: the same view of
    what is held where, and, each turn sent once the workers' reports show the last one ended, of
    their load. Both place a new conversation alike (nothing held there: the least loaded, the
    fewest prefixes held, the anchor's hash). Views that differ agree through the shared index
    (tests/test_routing_store.py), a prompt_cache_key, or hash placement (below)."""
    homes = sessions_over_two_gateways(warm_up_first=0)
    assert sorted(homes.count(i) for i in range(3)) == [2, 2, 2]  # new conversations spread


def test_two_gateways_with_hash_placement_agree_whatever_each_has_seen() -> None:
    """Only the first gateway saw the warm-up conversations, so their views differ; with
    --routing-placement hash a new conversation's first prefix decides alike on both."""
    sessions_over_two_gateways(warm_up_first=4, gateway_args=("--routing-placement", "hash"))


def sessions_over_two_gateways(warm_up_first: int, gateway_args: tuple[str, ...] = ()) -> list[int]:
    """Six conversations of 4 turns, alternating between two gateways that share no state (the
    second gateway takes each first turn); asserts each stayed on one worker, returns where."""
    registry = harness.Proc(["registry", "--port", "0", "--heartbeat-expiry", "3"]).start()
    gateways = [harness.gateway("--controller-address", registry.address, *gateway_args) for _ in range(2)]
    workers = [harness.echo_worker(registry.address, CHAT_MODEL, "--echo-tokens", "3") for _ in range(3)]
    try:
        stubs = []
        for gateway in gateways:
            channel = grpc.insecure_channel(gateway.address)
            stubs.append(api_pb2_grpc.InferenceServiceStub(channel))
        for stub in stubs:
            harness.wait_until(
                lambda s=stub: s.GetModel(api_pb2.GetModelRequest(model=CHAT_MODEL), timeout=5).model.workers == 3
            )

        def calls_in_view(stub: api_pb2_grpc.InferenceServiceStub) -> int:
            models = stub.GetStatus(api_pb2.GetStatusRequest(), timeout=5).models
            return sum(w.in_flight + w.queue_length for m in models for w in m.workers)

        def ask(stub: api_pb2_grpc.InferenceServiceStub, messages: list[common_pb2.ChatMessage]) -> str:
            # A report sent while the last call ran would have the other gateway count that call
            # (another gateway's, to it) until the next report: their views of the load would differ.
            harness.wait_until(lambda: not any(calls_in_view(s) for s in stubs), what="reports of no call")
            request = api_pb2.CreateChatCompletionRequest(model=CHAT_MODEL, messages=messages, max_tokens=3)
            return stub.CreateChatCompletion(request, timeout=30).choices[0].message.content

        for warm in range(warm_up_first):  # seen by the first gateway only
            ask(stubs[0], [common_pb2.ChatMessage(role="system", content=f"Warm-up {warm}.")])
        requests = lambda: [harness.worker_stats(w.address).requests_total for w in workers]  # noqa: E731
        homes = []
        for session in range(6):
            messages = [
                common_pb2.ChatMessage(role="system", content=f"Be brief, tenant {session}."),
                common_pb2.ChatMessage(role="user", content=f"session {session}"),
            ]
            before = requests()
            for turn in range(4):  # turns alternate between the gateways, the second one first
                reply = ask(stubs[(turn + 1) % 2], messages)
                messages.append(common_pb2.ChatMessage(role="assistant", content=reply))
                messages.append(common_pb2.ChatMessage(role="user", content=f"turn {turn}"))
            after = requests()
            landed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b > a]
            assert len(landed) == 1, (session, before, after)
            homes += landed
        return homes
    finally:
        for proc in (*workers, *gateways, registry):
            proc.stop()
