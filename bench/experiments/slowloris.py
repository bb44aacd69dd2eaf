"""Slowloris: how many half-open HTTP connections the REST bridge still holds after a while.

Starts a gateway, one echo chat worker and the bridge (extra bridge flags after
``--bridge-args``), then opens N connections that each send half a request:
``POST /v1/chat/completions HTTP/1.1``, one header, then nothing. It counts the
connections the bridge has not closed yet at a few marks up to ``--hold``
seconds, while one client (the openai SDK) keeps making ordinary requests, and
reports how many of those succeeded and their worst latency.

    .venv/bin/python -m bench.experiments.slowloris --connections 2000 --hold 30
    .venv/bin/python -m bench.experiments.slowloris --connections 2000 --hold 30 --bridge-args --request-read-timeout 5
"""

from __future__ import annotations

import argparse
import errno
import selectors
import socket
import threading
import time

import openai

from bench import servers
from bench.servers import Group

HALF_REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
MODEL = "echo-chat"


def open_half_requests(address: tuple[str, int], count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(address, timeout=10)
        sock.sendall(HALF_REQUEST)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer closed (EOF or reset); reads whatever it sent first (a 408)."""
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError as error:
            return error.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)
        if not data:
            return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--hold", type=float, default=30.0, help="seconds to watch the connections")
    parser.add_argument("--marks", default="1,3,5,10,20,30", help="seconds at which open connections are counted")
    parser.add_argument("--bridge-args", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()

    with Group() as group:
        gateway = group.start(servers.tokenwire("gateway", "gateway", "--port", "0"))
        group.start(
            servers.tokenwire(
                "worker",
                "worker",
                "--port",
                "0",
                "--controller-address",
                gateway.address,
                "--engine",
                "echo",
                "--model-name",
                MODEL,
                "--heartbeat-interval",
                "0.5",
            )
        )
        bridge = group.start(
            servers.tokenwire(
                "bridge", "bridge", "--port", "0", "--gateway-address", gateway.address, *args.bridge_args
            )
        )
        host, port = bridge.address.rsplit(":", 1)
        client = openai.OpenAI(base_url=f"http://{bridge.address}/v1", api_key="none", max_retries=0, timeout=10)
        deadline = time.monotonic() + 30
        while True:  # until the worker registered
            try:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
                break
            except openai.APIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

        begun = time.monotonic()
        sockets = open_half_requests((host, int(port)), args.connections)
        started = time.monotonic()  # the marks count from here, when the last one is open
        opened = started - begun
        served: list[float] = []
        failed: list[str] = []
        stop = threading.Event()

        def ordinary_requests() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}])
                    served.append(time.monotonic() - sent)
                except openai.APIError as error:
                    failed.append(type(error).__name__)
                stop.wait(0.25)

        thread = threading.Thread(target=ordinary_requests)
        thread.start()
        open_now = set(range(len(sockets)))
        selector = selectors.DefaultSelector()
        for index, sock in enumerate(sockets):
            selector.register(sock, selectors.EVENT_READ, index)
        marks = [float(m) for m in args.marks.split(",") if float(m) <= args.hold]
        counts = {}
        for mark in marks:
            while (left := started + mark - time.monotonic()) > 0:
                for key, _ in selector.select(timeout=min(left, 0.2)):
                    if key.data in open_now and closed_by_peer(key.fileobj):  # type: ignore[arg-type]
                        open_now.discard(key.data)
                        selector.unregister(key.fileobj)
            counts[mark] = len(open_now)
        stop.set()
        thread.join()
        for sock in sockets:
            sock.close()

    print(f"bridge flags: {' '.join(args.bridge_args) or '(defaults)'}")
    print(f"{args.connections} half-open connections opened in {opened:.1f} s")
    print("seconds after opening | connections the bridge still holds")
    for mark, count in counts.items():
        print(f"{mark:>5g} | {count}")
    worst = max(served) * 1000 if served else float("nan")
    print(
        f"ordinary requests meanwhile: {len(served)} served (worst {worst:.0f} ms), {len(failed)} failed {failed[:5]}"
    )


if __name__ == "__main__":
    main()
