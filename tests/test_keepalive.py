"""gRPC keepalive between tokenwire's parts: a stream that stays silent for
longer than the ping intervals is kept, pings and all (common/grpc_server.py).

A health Watch is such a stream: one message, then nothing until the status
changes. gRPC's server default accepts a ping without data only every 5 min
and sends GOAWAY (too_many_pings) after two early ones; tokenwire's servers
accept one every 10 s, so a client pinging at that rate keeps its stream.
"""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.grpc_server import CHANNEL_KEEPALIVE, MIN_PING_INTERVAL_MS
from tests import harness


def test_a_silent_stream_survives_pings_at_the_accepted_interval() -> None:
    gateway = harness.gateway()
    try:
        # Our channels' settings, pinging as often as the servers accept (our channels: every 20 s).
        options = [*dict(CHANNEL_KEEPALIVE, **{"grpc.keepalive_time_ms": MIN_PING_INTERVAL_MS}).items()]
        with grpc.insecure_channel(gateway.address, options=options) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            seen: list[object] = []

            def read() -> None:
                try:
                    for message in watch:
                        seen.append(message.status)
                except grpc.RpcError as error:
                    seen.append(error.code())

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            time.sleep(3.5 * MIN_PING_INTERVAL_MS / 1000)  # three pings on a silent stream
            watch.cancel()
            reader.join(10)
        assert seen == [health_pb2.HealthCheckResponse.SERVING, grpc.StatusCode.CANCELLED]
    finally:
        gateway.stop()
