"""GetStatus / GET /v1/status: the cluster as a user may see it, the same
figures as `tokenwire status` without the addresses and ids."""

from __future__ import annotations

import subprocess
import sys

import grpc
import httpx
import pytest

from gateway.cluster_status import build_status
from tests.conftest import API_KEY, CHAT_MODEL, EMBED_MODEL, EchoSystem
from tokenwire.v1 import api_pb2, api_pb2_grpc, common_pb2, registry_pb2

AUTH = (("authorization", f"Bearer {API_KEY}"),)


def test_build_status_groups_workers_by_model() -> None:
    chat = common_pb2.ModelInfo(name="b-chat", kind=common_pb2.MODEL_KIND_CHAT, context_length=64, engine="echo")
    gone = common_pb2.ModelInfo(name="a-gone", kind=common_pb2.MODEL_KIND_CHAT)
    workers = [
        registry_pb2.WorkerStatus(
            worker_id=f"w{i}", address=f"10.0.0.{i}:1", model=chat, capacity=5, in_flight=i, last_heartbeat_unix_ms=1000
        )
        for i in (2, 1)
    ]
    reply = build_status([chat, gone], workers, {"w1": "SERVING", "w2": "NOT_SERVING"}, now_ms=3500)
    assert [m.model for m in reply.models] == ["a-gone", "b-chat"]
    assert list(reply.models[0].workers) == []  # known, but no live worker now
    loads = reply.models[1].workers
    assert [(w.in_flight, w.health) for w in loads] == [(1, "SERVING"), (2, "NOT_SERVING")]  # by address
    assert loads[0].heartbeat_age_seconds == pytest.approx(2.5)
    assert reply.models[1].engine == "echo" and reply.models[1].context_length == 64
    assert b"10.0.0" not in reply.SerializeToString() and b"w1" not in reply.SerializeToString()


async def test_get_status_rpc_needs_a_key(echo_system: EchoSystem) -> None:
    async with grpc.aio.insecure_channel(echo_system.grpc_address) as channel:
        stub = api_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetStatus(api_pb2.GetStatusRequest())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = await stub.GetStatus(api_pb2.GetStatusRequest(), metadata=AUTH)
    models = {m.model: m for m in reply.models}
    assert len(models[CHAT_MODEL].workers) == len(echo_system.chat_workers)
    assert models[EMBED_MODEL].kind == common_pb2.MODEL_KIND_EMBEDDING
    assert all(w.health == "SERVING" and w.capacity == 5 for m in reply.models for w in m.workers)


def test_rest_status_matches_the_status_command(echo_system: EchoSystem) -> None:
    assert httpx.get(f"{echo_system.url}/v1/status").status_code == 401
    reply = httpx.get(f"{echo_system.url}/v1/status", headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 200
    body = reply.json()
    for proc in (*echo_system.chat_workers, echo_system.embed_worker):
        assert proc.address not in reply.text
    cli = subprocess.run(
        [sys.executable, "-m", "tokenwire_cli", "status", "--controller-address", echo_system.grpc_address],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    # One table row per worker: model, kind, address, in flight/capacity, queue, heartbeat, health, id.
    rows = [line.split() for line in cli.splitlines()[1:]]
    from_cli = sorted((r[0], r[1], r[3].split("/")[1], r[7]) for r in rows)
    from_rest = sorted(
        (m["id"], m["kind"], str(w["capacity"]), w["health"]) for m in body["models"] for w in m["workers"]
    )
    assert from_cli == from_rest
    chat = next(m for m in body["models"] if m["id"] == CHAT_MODEL)
    assert chat["live_workers"] == len(echo_system.chat_workers) and chat["engine"] == "echo"
