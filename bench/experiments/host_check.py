"""What the bridge's Host check (rest_bridge/origins.py) costs a request: the CPU of the
middleware alone, in isolation, against the bare ASGI call it wraps.

A request's headers as the OpenAI SDK sends them, its Host already seen (a Host is parsed and
judged once, then remembered with its verdict). CORS costs nothing
by default: it is not installed while no origin is allowed. The JSON content-type check is one
header read per body, beside the body's parse.

    .venv/bin/python -m bench.experiments.host_check --requests 200000
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from rest_bridge.origins import HostCheck

HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"accept", b"application/json"),
    (b"content-type", b"application/json"),
    (b"user-agent", b"OpenAI/Python 1.99.0"),
    (b"authorization", b"Bearer none"),
    (b"content-length", b"120"),
]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    return None


async def cpu_per_call(target: Any, scopes: list[dict[str, Any]]) -> float:
    """CPU nanoseconds per call (process time: the machine's other load does not count)."""
    started = time.process_time()
    for scope in scopes:
        await target(scope, None, None)
    return (time.process_time() - started) / len(scopes) * 1e9


async def main(requests: int) -> None:
    seen = [{"type": "http", "headers": HEADERS}] * requests
    check = HostCheck(app, frozenset())
    bare = await cpu_per_call(app, seen)
    print(f"bare ASGI call         {bare:6.0f} ns")
    print(f"with the Host check    {await cpu_per_call(check, seen):6.0f} ns")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200000)
    asyncio.run(main(parser.parse_args().requests))
