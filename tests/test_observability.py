"""Metrics move by the right amounts, request ids reach every log, readiness,
and the status command."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest

from tests import harness

MODEL = "echo-obs"


@pytest.fixture(scope="module")
def system():
    gateway = harness.gateway("--metrics-port", "0", "--heartbeat-expiry", "3")
    bridge = harness.bridge(gateway.address)
    url = f"http://{bridge.address}"
    # Not ready before any worker registers.
    assert httpx.get(f"{url}/ready").status_code == 503
    assert httpx.get(f"{url}/health").status_code == 200
    # 10 ms per token: one delta per token, as from a real engine (faster
    # engines get tokens grouped per message).
    worker = harness.echo_worker(
        gateway.address, MODEL, "--metrics-port", "0", "--echo-tokens", "5", "--echo-delay", "0.01"
    )
    harness.wait_for_workers(url, MODEL, 1)
    harness.wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200)
    yield gateway, worker, bridge, url
    for proc in (bridge, worker, gateway):
        proc.stop()


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_move_by_the_right_amounts(system) -> None:
    gateway, worker, _bridge, url = system
    gw_url, wk_url, br_url = (
        f"http://{gateway.metrics_address}/metrics",
        f"http://{worker.metrics_address}/metrics",
        f"{url}/metrics",
    )
    before = {"gw": harness.scrape(gw_url), "wk": harness.scrape(wk_url), "br": harness.scrape(br_url)}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a b"}], max_tokens=4)
    list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a b"}], max_tokens=4, stream=True
        )
    )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=9)
    after = {"gw": harness.scrape(gw_url), "wk": harness.scrape(wk_url), "br": harness.scrape(br_url)}

    gw = lambda key: delta(before["gw"], after["gw"], key)  # noqa: E731
    assert gw(f'tokenwire_requests_total{{kind="chat",model="{MODEL}",status="ok"}}') == 3
    assert gw(f'tokenwire_requests_total{{kind="chat_stream",model="{MODEL}",status="ok"}}') == 1
    assert gw(f'tokenwire_requests_total{{kind="chat",model="{MODEL}",status="invalid_request_error"}}') == 1
    # "user: a b" is 3 echo tokens; 4 requests x 4 completion tokens.
    assert gw(f'tokenwire_prompt_tokens_total{{model="{MODEL}"}}') == 12
    assert gw(f'tokenwire_completion_tokens_total{{model="{MODEL}"}}') == 16
    # Token timing comes from the streamed request: 1 first token, 3 gaps.
    assert gw(f'tokenwire_time_to_first_token_seconds_count{{model="{MODEL}"}}') == 1
    assert gw(f'tokenwire_inter_token_latency_seconds_count{{model="{MODEL}"}}') == 3
    assert gw(f'tokenwire_request_duration_seconds_count{{kind="chat",model="{MODEL}"}}') == 4
    assert gw(f'tokenwire_request_duration_seconds_count{{kind="chat_stream",model="{MODEL}"}}') == 1
    assert after["gw"][f'tokenwire_live_workers{{model="{MODEL}"}}'] == 1

    wk = lambda key: delta(before["wk"], after["wk"], key)  # noqa: E731
    assert wk(f'tokenwire_engine_requests_total{{model="{MODEL}",rpc="generate",status="ok"}}') == 4
    assert wk(f'tokenwire_engine_generated_tokens_total{{model="{MODEL}"}}') == 16
    assert after["wk"][f'tokenwire_engine_in_flight{{model="{MODEL}"}}'] == 0

    br = lambda key: delta(before["br"], after["br"], key)  # noqa: E731
    assert br('tokenwire_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}') == 4
    assert br('tokenwire_http_requests_total{method="POST",route="/v1/chat/completions",status="400"}') == 1
    # No request ids or keys as label values.
    assert not any("x-request-id" in key or "Bearer" in key for key in after["gw"])


def test_each_process_exposes_only_its_own_metrics(system) -> None:
    gateway, worker, _bridge, url = system
    names = {
        part: {line.split()[2] for line in httpx.get(address).text.splitlines() if line.startswith("# TYPE tokenwire_")}
        for part, address in (
            ("gateway", f"http://{gateway.metrics_address}/metrics"),
            ("worker", f"http://{worker.metrics_address}/metrics"),
            ("bridge", f"{url}/metrics"),
        )
    }
    assert names["bridge"] and all(n.startswith("tokenwire_http_") for n in names["bridge"]), names["bridge"]
    assert names["worker"] and all(n.startswith("tokenwire_engine_") for n in names["worker"]), names["worker"]
    assert "tokenwire_requests_total" in names["gateway"]
    assert not any(n.startswith(("tokenwire_http_", "tokenwire_engine_")) for n in names["gateway"]), names["gateway"]


def test_one_process_front_end_keeps_each_parts_metrics() -> None:
    """serve's front end: the gateway and the bridge in one process, each /metrics still its own
    part's, and each counting what went through it."""
    front = harness.Proc(["front-end", "--port", "0", "--metrics-port", "0", "--bridge", "--port", "0"]).start()
    assert front.launched is not None
    try:
        harness.wait_until(lambda: front.launched is not None and front.launched.part_address("bridge"))
        url = "http://" + front.launched.part_address("bridge")
        worker = harness.echo_worker(front.launched.part_address("gateway"), "echo-one-process")
        try:
            harness.wait_for_workers(url, "echo-one-process", 1)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            reply = client.chat.completions.create(
                model="echo-one-process", messages=[{"role": "user", "content": "a b"}], max_tokens=2
            )
            assert reply.choices[0].message.content == "a b"
            gateway_metrics = harness.scrape(f"http://{front.metrics_address}/metrics")
            bridge_metrics = harness.scrape(f"{url}/metrics")
        finally:
            worker.stop()
    finally:
        assert front.stop() == 0
    assert gateway_metrics['tokenwire_requests_total{kind="chat",model="echo-one-process",status="ok"}'] == 1
    assert not any(name.startswith(("tokenwire_http_", "tokenwire_engine_")) for name in gateway_metrics)
    chat_route = 'tokenwire_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}'
    assert bridge_metrics[chat_route] == 1
    assert all(name.startswith(("tokenwire_http_", "process_", "python_")) for name in bridge_metrics), bridge_metrics
    assert "Traceback" not in front.log()


def test_request_id_reaches_every_hop(system) -> None:
    gateway, worker, bridge, url = system
    rid = "test-rid-0123456789"
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "trace me"}]},
        headers={"X-Request-Id": rid},
    )
    assert reply.status_code == 200
    assert reply.headers["x-request-id"] == rid
    harness.wait_until(lambda: rid in gateway.log() and rid in worker.log() and rid in bridge.log())
    # The log lines carry the request's facts, never the prompt.
    line = next(line for line in gateway.log().splitlines() if rid in line and "request" in line)
    assert f"model={MODEL}" in line and "status=ok" in line and "latency_ms=" in line
    assert "trace me" not in gateway.log() + worker.log() + bridge.log()
    # Without a client id, one is made and returned.
    made = httpx.get(f"{url}/v1/models").headers["x-request-id"]
    assert len(made) >= 16


def test_json_logs(system) -> None:
    gateway = harness.gateway("--log-format", "json")
    try:
        import json

        first = json.loads(gateway.log().splitlines()[0])
        assert {"ts", "level", "logger", "request_id", "message"} <= set(first)
    finally:
        gateway.stop()


def test_status_lists_workers(system) -> None:
    gateway, worker, _bridge, _url = system

    def status() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "tokenwire_cli", "status", "--controller-address", gateway.address],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = status()
    assert MODEL in out and worker.address in out and "SERVING" in out
    # In flight / capacity, as of the worker's last heartbeat (every 0.5 s here):
    # one sent during an earlier test's request may still say 1/5.
    harness.wait_until(lambda: "0/5" in status(), what="0/5 in flight")


def test_worker_not_serving_while_loading() -> None:
    """A worker answers health NOT_SERVING while its model loads, then SERVING
    (the embedding model takes seconds to load; the port is fixed to probe it early)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.test_cli import free_port

    gateway = harness.gateway()
    port = free_port()
    worker = harness.worker(gateway.address, "--engine", "embeddings", "--port", str(port), wait=False)
    seen = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def probe() -> bool:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                except grpc.RpcError:
                    return False
                if not seen or seen[-1] != status:
                    seen.append(status)
                return status == health_pb2.HealthCheckResponse.SERVING

            harness.wait_until(probe, timeout=60, interval=0.02)
        assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING]
        worker.wait_ready()
    finally:
        worker.stop()
        gateway.stop()
