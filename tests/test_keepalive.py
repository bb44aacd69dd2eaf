"""gRPC keepalive between tokenwire's parts: a stream that stays silent for
longer than the ping intervals is kept, pings and all (common/grpc_server.py).

A health Watch is such a stream: one message, then nothing until the status
changes. gRPC's server default accepts a ping without data only every 5 min
and sends GOAWAY (too_many_pings) after two early ones; tokenwire's servers
accept one every half keepalive interval (4 s by default), so a client pinging
at that rate keeps its stream, and one pinging faster is sent away.

The gateways here run with a short interval (TOKENWIRE_GRPC_KEEPALIVE_INTERVAL),
and the tests count the pings the gateway received, from grpc's own trace.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.grpc_server import KEEPALIVE_INTERVAL_ENV, KEEPALIVE_TIMEOUT_ENV, Keepalive
from tests import harness

# A grpc client sends at most one ping a second, whatever its keepalive time:
# servers that accept one a second (an interval of 2 s) are tested at their limit.
INTERVAL = 2.0
# A ping that grpc's server measured against the one before it (the first is not).
MEASURED_PING = re.compile(r"SERVER\[\w+\]: received ping \d+: .* next_allowed_ping=@\d")


def watch_while_pinging(server_interval: float, ping_every_ms: int, until: int) -> tuple[list[object], str, int]:
    """A Watch on a gateway whose keepalive interval is ``server_interval``, from a
    channel with our channels' settings that pings every ``ping_every_ms``. Once the
    gateway has measured ``until`` pings, or the stream ended: what the stream
    brought (statuses, then its end's code), the end's details, and the number of
    pings the gateway measured."""
    gateway = harness.gateway(
        env={KEEPALIVE_INTERVAL_ENV: str(server_interval), "GRPC_VERBOSITY": "debug", "GRPC_TRACE": "http_keepalive"}
    )
    try:
        options = dict(Keepalive(server_interval).channel_options(), **{"grpc.keepalive_time_ms": ping_every_ms})
        with grpc.insecure_channel(gateway.address, options=[*options.items()]) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            seen: list[object] = []
            details: list[str] = []

            def read() -> None:
                try:
                    for message in watch:
                        seen.append(message.status)
                except grpc.RpcError as error:
                    seen.append(error.code())
                    details.append(error.details())

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            harness.wait_until(
                lambda: not reader.is_alive() or len(MEASURED_PING.findall(gateway.log())) >= until,
                what=f"{until} pings received by the gateway, or the stream ended",
            )
            watch.cancel()
            reader.join(harness.WAIT_TIMEOUT)
        return seen, "".join(details), len(MEASURED_PING.findall(gateway.log()))
    finally:
        gateway.stop()


def test_a_silent_stream_survives_pings_at_the_accepted_interval() -> None:
    # Pinging as often as the server accepts (our channels ping half as often).
    # Four pings: a server that refused them would have sent GOAWAY at the third
    # and closed the connection, so a fourth is never sent on it.
    accepted = Keepalive(INTERVAL).min_ping_interval_ms
    seen, _, pings = watch_while_pinging(INTERVAL, accepted, until=4)
    assert pings >= 4
    assert seen == [health_pb2.HealthCheckResponse.SERVING, grpc.StatusCode.CANCELLED]


def test_a_client_pinging_faster_is_sent_away() -> None:
    # The other side of the same limit, so that the test above cannot pass for
    # want of pings: every ping comes at half the accepted interval, and the third
    # early one (grpc's max_ping_strikes is 2) ends the stream.
    accepted = Keepalive(2 * INTERVAL).min_ping_interval_ms
    seen, details, _ = watch_while_pinging(2 * INTERVAL, accepted // 2, until=10)
    assert seen == [health_pb2.HealthCheckResponse.SERVING, grpc.StatusCode.UNAVAILABLE]
    assert details == "Too many pings"


def test_the_default_settings_are_the_documented_ones() -> None:
    # docs/limits-and-robustness.md: channels ping after 8 s and wait 4 s for the answer (any
    # ping's: grpc's flow-control pings too), so a silent peer is given up within 12 s, and
    # dial a lost one again at most 8 s apart; servers accept a ping every 4 s and ping a
    # silent client after 12 s.
    default = Keepalive.from_env({})
    assert (default.time_ms, default.timeout_ms, default.min_ping_interval_ms, default.server_time_ms) == (
        8_000,
        4_000,
        4_000,
        12_000,
    )
    assert default.detection == 12.0
    channel = dict(default.channel_options())
    assert (channel["grpc.keepalive_time_ms"], channel["grpc.http2.ping_timeout_ms"]) == (8_000, 4_000)
    assert channel["grpc.max_reconnect_backoff_ms"] == 8_000
    assert dict(default.server_options())["grpc.http2.min_ping_interval_without_data_ms"] == 4_000
    assert Keepalive.from_env({KEEPALIVE_INTERVAL_ENV: "0.5"}).min_ping_interval_ms == 250
    assert Keepalive.from_env({KEEPALIVE_TIMEOUT_ENV: "2"}).detection == 10.0


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
@pytest.mark.parametrize("variable", [KEEPALIVE_INTERVAL_ENV, KEEPALIVE_TIMEOUT_ENV])
def test_a_setting_that_is_no_positive_number_is_refused(variable: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{variable}\\) must be a positive number of seconds"):
        Keepalive.from_env({variable: value})


def test_a_part_given_a_bad_interval_stops_naming_the_flag_and_the_variable() -> None:
    for argv, env in (([], {KEEPALIVE_INTERVAL_ENV: "soon"}), (["--grpc-keepalive-interval", "soon"], {})):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "--port", "0", *argv],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert (
            f"--grpc-keepalive-interval ({KEEPALIVE_INTERVAL_ENV}) must be a positive number of seconds, not 'soon'"
            in result.stderr
        )
