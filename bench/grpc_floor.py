"""The floor under every tokenwire hop: an empty grpc.aio server on this machine.

A server process answers with no work at all (uvloop, as tokenwire's servers run);
the client in this process drives it at a fixed concurrency and reads the server's
CPU from /proc. Three call shapes, each with no interceptor and with three
pass-through interceptors (tokenwire's servers run three: request id, auth, errors):

- ``unary``: one request, one response (the bridge -> gateway call of a non-streamed request);
- ``stream_1``: one request, a stream of one message (a whole choice sent as a stream);
- ``stream_2``: one request, a stream of two messages ("accepted" + one chunk).

Prints one JSON object. Run by ``bench/run.py`` (section ``floor``), or alone:

    bench/.venv/bin/python -m bench.grpc_floor --concurrency 32 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import time
from typing import Any

import grpc
import uvloop
from google.protobuf import wrappers_pb2

from bench.servers import cpu_seconds

# Any small generated message will do: protobuf's own wrappers.
Request = wrappers_pb2.Int32Value
Response = wrappers_pb2.Int32Value
SHAPES = ("unary", "stream_1", "stream_2")


def serialize(message: Any) -> bytes:
    return message.SerializeToString()  # type: ignore[no-any-return]


async def unary(request: Request, context: Any) -> Response:
    return Response(value=1)


async def stream_1(request: Request, context: Any) -> Any:
    yield Response(value=1)


async def stream_2(request: Request, context: Any) -> Any:
    yield Response(value=0)
    yield Response(value=1)


class PassThrough(grpc.aio.ServerInterceptor):
    """Wraps the handler like tokenwire's interceptors do, and does nothing else."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def wrapped_unary(request: Any, context: Any) -> Any:
                return await inner(request, context)

            return handler._replace(unary_unary=wrapped_unary)
        inner_stream = handler.unary_stream

        async def wrapped_stream(request: Any, context: Any) -> Any:
            async for response in inner_stream(request, context):
                yield response

        return handler._replace(unary_stream=wrapped_stream)


def serve(ports: Any, interceptors: int) -> None:
    async def main() -> None:
        server = grpc.aio.server(interceptors=[PassThrough() for _ in range(interceptors)])
        handlers = {
            "unary": grpc.unary_unary_rpc_method_handler(unary, Request.FromString, serialize),
            "stream_1": grpc.unary_stream_rpc_method_handler(stream_1, Request.FromString, serialize),
            "stream_2": grpc.unary_stream_rpc_method_handler(stream_2, Request.FromString, serialize),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Floor", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ports.put(port)
        await server.wait_for_termination()

    uvloop.run(main())


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drive(port: int, shape: str, concurrency: int, seconds: float) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        path = f"/floor.Floor/{shape}"
        if shape == "unary":
            call_unary = channel.unary_unary(
                path, request_serializer=serialize, response_deserializer=Response.FromString
            )
        else:
            call_stream = channel.unary_stream(
                path, request_serializer=serialize, response_deserializer=Response.FromString
            )
        calls = 0
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal calls
            while time.perf_counter() < deadline:
                if shape == "unary":
                    await call_unary(Request())
                else:
                    async for _ in call_stream(Request()):
                        pass
                calls += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return calls


def measure(concurrency: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"concurrency": concurrency, "duration_s": seconds, "shapes": {}}
    for interceptors in (0, 3):
        ports: Any = multiprocessing.Queue()
        server = multiprocessing.Process(target=serve, args=(ports, interceptors), daemon=True)
        server.start()
        try:
            port = ports.get(timeout=30)
            for shape in SHAPES:
                uvloop.run(drive(port, shape, concurrency, 0.5))  # warm-up
                server0, client0 = cpu_seconds(server.pid), own_cpu()  # type: ignore[arg-type]
                calls = uvloop.run(drive(port, shape, concurrency, seconds))
                server1, client1 = cpu_seconds(server.pid), own_cpu()  # type: ignore[arg-type]
                out["shapes"][f"{shape}/{interceptors}"] = {
                    "shape": shape,
                    "interceptors": interceptors,
                    "calls_per_s": calls / seconds,
                    "server_us_per_call": 1e6 * (server1 - server0) / calls,
                    "client_us_per_call": 1e6 * (client1 - client0) / calls,
                }
        finally:
            server.kill()
            server.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    print(json.dumps(measure(args.concurrency, args.duration)), flush=True)


if __name__ == "__main__":
    main()
