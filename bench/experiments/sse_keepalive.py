"""What SSE keep-alives cost a busy stream: the bridge's CPU per SSE chunk, keep-alives on and off.

A gateway and one echo worker (1000 tokens per answer, 1 ms apart: one SSE chunk each) behind two bridges, one
with ``--sse-keepalive-interval 15`` (the default) and one with ``0`` (off). Streams go to
each bridge in turn, several rounds; the figure is the bridge process's CPU
(``/proc/<pid>/stat``) divided by the SSE chunks it sent.

    .venv/bin/python -m bench.experiments.sse_keepalive --streams 20 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx

from bench import servers
from bench.servers import Group

MODEL = "echo-chat"


def stream_chunks(client: httpx.Client, url: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "alpha beta gamma"}], "stream": True}
    chunks = 0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += 1
    return chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=20, help="streams per bridge per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with Group() as group:
        gateway = group.start(servers.tokenwire("gateway", "gateway", "--port", "0"))
        worker_flags = ["--engine", "echo", "--model-name", MODEL, "--echo-tokens", "1000", "--echo-delay", "0.001"]
        group.start(
            servers.tokenwire("worker", "worker", "--port", "0", "--controller-address", gateway.address, *worker_flags)
        )
        bridges = {
            interval: group.start(
                servers.tokenwire(
                    f"bridge-{interval}",
                    "bridge",
                    "--port",
                    "0",
                    "--gateway-address",
                    gateway.address,
                    "--sse-keepalive-interval",
                    interval,
                )
            )
            for interval in ("15", "0")
        }
        per_chunk: dict[str, list[float]] = {interval: [] for interval in bridges}
        with httpx.Client(timeout=60) as client:
            for bridge in bridges.values():  # warm-up, and the worker registered
                deadline = time.monotonic() + 30
                while not _ready(client, f"http://{bridge.address}"):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the echo worker never served")
                    time.sleep(0.2)
            for _ in range(args.rounds):
                for interval, bridge in bridges.items():
                    url = f"http://{bridge.address}"
                    before = bridge.cpu()
                    chunks = sum(stream_chunks(client, url) for _ in range(args.streams))
                    per_chunk[interval].append((bridge.cpu() - before) / chunks * 1e6)
    print(f"{args.streams} streams of 1000 tokens per bridge per round, {args.rounds} rounds")
    print("keep-alive interval | bridge CPU per SSE chunk (µs), median of rounds | rounds")
    for interval, figures in per_chunk.items():
        rounds = ", ".join(f"{f:.0f}" for f in figures)
        print(f"{interval:>5} s | {statistics.median(figures):.0f} | {rounds}")


def _ready(client: httpx.Client, url: str) -> bool:
    try:
        return stream_chunks(client, url) > 0
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
