"""A TCP relay that delays what it forwards: latency and jitter between the network tests'
hosts, since this kernel has no ``netem`` qdisc (``tc qdisc add ... netem`` answers that the
kind is unknown).

    python -m tests.delay_relay --listen HOST:PORT --to HOST:PORT --delay-ms 100 --jitter-ms 20

Every chunk read on one side is written to the other side ``delay +- jitter`` ms (uniform)
after it arrived, in both directions, and never before the chunk ahead of it: a TCP stream
keeps its order, so jitter shows as bunching, as it does through a real queue. An end of
stream (FIN) is delayed like data; an error on either side closes both. The delay starts on
(``--off`` starts it at 0); SIGUSR2 turns it off and SIGUSR1 on again, for chunks read from
then on, so a test can measure one path with and without it. Prints ``READY relay HOST:PORT``
once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal


class Delay:
    """The delay a chunk read now gets; switched on and off by signals."""

    def __init__(self, delay: float, jitter: float, on: bool, seed: int | None) -> None:
        self.delay, self.jitter, self.on = delay, jitter, on
        self._random = random.Random(seed)

    def sample(self) -> float:
        if not self.on:
            return 0.0
        return max(0.0, self.delay + self._random.uniform(-self.jitter, self.jitter))


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Delay) -> None:
    """One direction: read, hold each chunk until it is due, write in order."""
    loop = asyncio.get_running_loop()
    due: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

    async def read() -> None:
        last = 0.0
        while True:
            try:
                data: bytes | None = await reader.read(65536)
            except ConnectionError:
                data = None  # passed on, in its turn, as an error
            last = max(loop.time() + delay.sample(), last)
            due.put_nowait((last, data))
            if not data:
                return

    reading = asyncio.create_task(read())
    try:
        while True:
            when, data = await due.get()
            wait = when - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                raise ConnectionError("the other side failed")
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading


async def _relay(
    client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, target: tuple[str, int], delay: Delay
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.transport.abort()
        return
    pumps = [
        asyncio.create_task(_pump(client_reader, server_writer, delay)),
        asyncio.create_task(_pump(server_reader, client_writer, delay)),
    ]
    try:
        # Both directions end (FIN each way), or one side resets and both go.
        done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        if any(task.exception() is not None for task in done):
            raise ConnectionError
        await asyncio.gather(*pumps)
    except (ConnectionError, OSError):
        pass
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for writer in (client_writer, server_writer):
            writer.transport.abort()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main(args: argparse.Namespace) -> None:
    delay = Delay(args.delay_ms / 1000, args.jitter_ms / 1000, not args.off, args.seed)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(delay, "on", True))
    loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(delay, "on", False))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    target = _address(args.to)
    host, port = _address(args.listen)
    server = await asyncio.start_server(lambda r, w: _relay(r, w, target, delay), host, port)
    bound = server.sockets[0].getsockname()[1]
    print(f"READY relay {host}:{bound}", flush=True)
    async with server:
        await stop.wait()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.delay_relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept connections on (port 0: any)")
    parser.add_argument("--to", required=True, help="HOST:PORT to forward them to")
    parser.add_argument("--delay-ms", type=float, default=100.0, help="one-way delay, each direction")
    parser.add_argument("--jitter-ms", type=float, default=20.0, help="uniform +- around the delay")
    parser.add_argument("--off", action="store_true", help="start with no delay (SIGUSR1 turns it on)")
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
