"""A zero-cost fake FastChat model worker, for benchmarking FastChat's API server.

It speaks FastChat 0.2.36's worker HTTP protocol (``fastchat/serve/base_model_worker.py``)
and answers instantly with the same token counts as tokenwire's echo engine, so a
benchmark of FastChat's ``openai_api_server`` + ``controller`` measures those two and
not a model:

- ``POST /worker_generate_stream``: JSON objects terminated by ``b"\\0"``, each with the
  *cumulative* text (FastChat's protocol), one per token like the vLLM worker
  (``stream_interval`` 1), the last one with ``finish_reason``;
- ``POST /worker_generate``: the last chunk as JSON;
- ``POST /worker_get_embeddings``: ``{"embedding": [[float]], "token_num": int}``;
- ``POST /count_token``, ``/model_details``, ``/worker_get_conv_template``,
  ``/worker_get_status``.

It registers with the controller (``/register_worker`` with its status, so the
controller does not poll it) and heartbeats (``/receive_heart_beat``) every
``--heartbeat-interval`` seconds (FastChat's default: 45), re-registering when the
controller forgot it. Concurrency is bounded by an ``asyncio.Semaphore`` like
FastChat's (``--limit-worker-concurrency``).

Tokens are whitespace-separated words, like the echo engine: the output cycles over
``--words``, ``min(max_new_tokens, --tokens)`` of them, ``--delay`` seconds apart when
streamed; prompt tokens are the words of the rendered prompt.

It is a bare ASGI app on uvicorn (uvloop + httptools), no FastAPI, and it pre-encodes
what it can: its own CPU use is reported apart from the API server's and controller's.
Prints ``READY fake-worker <host>:<port>`` once it serves, like tokenwire's parts.

Run it with a Python that has uvicorn (the bench venv):
    bench/.venv/bin/python -m bench.fake_fastchat_worker --controller-address http://127.0.0.1:21001 --model-name echo-chat
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import sys
import threading
import time
import urllib.request
from typing import Any

try:
    import orjson

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)

    loads = orjson.loads
except ImportError:  # pragma: no cover - the bench venv has orjson

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    loads = json.loads

# FastChat's SeparatorStyle.ADD_COLON_SINGLE (fastchat/conversation.py); the prompt
# becomes "user: <content>\nassistant:", like the echo engine's "template".
ADD_COLON_SINGLE = 1


def conv_template(name: str) -> dict[str, Any]:
    """A Conversation as FastChat's worker returns it (the dataclass as JSON)."""
    return {
        "name": name,
        "system_template": "{system_message}",
        "system_message": "",
        "roles": ["user", "assistant"],
        "messages": [],
        "offset": 0,
        "sep_style": ADD_COLON_SINGLE,
        "sep": "\n",
        "sep2": None,
        "stop_str": None,
        "stop_token_ids": None,
        "max_image_size_mb": None,
    }


class FakeWorker:
    def __init__(self, args: argparse.Namespace, address: str) -> None:
        self.args = args
        self.address = address
        self.words = args.words.split() or ["echo"]
        self.semaphore = asyncio.Semaphore(args.limit_worker_concurrency)
        vector = [1.0 / math.sqrt(args.dimensions)] * args.dimensions
        self.vector_json = dumps(vector)
        self.conv_json = dumps({"conv": conv_template(args.model_name)})
        self.details_json = dumps({"context_length": args.context_length})
        self.calls = 0

    # -- status ------------------------------------------------------------------------

    def queue_length(self) -> int:
        sem = self.semaphore
        waiters = len(sem._waiters) if getattr(sem, "_waiters", None) else 0  # FastChat reads these too
        return self.args.limit_worker_concurrency - sem._value + waiters

    def status(self) -> dict[str, Any]:
        return {"model_names": [self.args.model_name], "speed": 1, "queue_length": self.queue_length()}

    # -- generation ---------------------------------------------------------------------

    def _pieces(self, params: dict[str, Any]) -> tuple[list[str], int, str]:
        max_new = int(params.get("max_new_tokens") or self.args.tokens)
        count = min(max_new, self.args.tokens)
        pieces = [
            (w if i == 0 else " " + w) for i, w in enumerate(self.words[i % len(self.words)] for i in range(count))
        ]
        prompt_tokens = len(str(params.get("prompt", "")).split())
        finish = "length" if count == max_new else "stop"
        return pieces, prompt_tokens, finish

    @staticmethod
    def _chunk(text: str, prompt_tokens: int, completion: int, finish: str | None) -> dict[str, Any]:
        return {
            "text": text,
            "error_code": 0,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            },
            "finish_reason": finish,
        }

    async def stream(self, params: dict[str, Any], send: Any) -> None:
        pieces, prompt_tokens, finish = self._pieces(params)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        text = ""
        for i, piece in enumerate(pieces):
            if self.args.delay:
                await asyncio.sleep(self.args.delay)
            text += piece
            last = i == len(pieces) - 1
            # The last token carries the finish_reason, as FastChat's HF worker does.
            body = dumps(self._chunk(text, prompt_tokens, i + 1, finish if last else None)) + b"\0"
            await send({"type": "http.response.body", "body": body, "more_body": True})
        if not pieces:
            await send(
                {
                    "type": "http.response.body",
                    "body": dumps(self._chunk("", prompt_tokens, 0, finish)) + b"\0",
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def generate(self, params: dict[str, Any]) -> bytes:
        pieces, prompt_tokens, finish = self._pieces(params)
        return dumps(self._chunk("".join(pieces), prompt_tokens, len(pieces), finish))

    def embeddings(self, params: dict[str, Any]) -> bytes:
        inputs = params.get("input") or []
        tokens = sum(len(str(text).split()) for text in inputs)
        return b'{"embedding":[' + b",".join([self.vector_json] * len(inputs)) + b'],"token_num":%d}' % tokens

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        self.calls += 1
        if path == "/worker_generate_stream":
            params = loads(body)
            await self.semaphore.acquire()
            try:
                await self.stream(params, send)
            finally:
                self.semaphore.release()
            return
        if path == "/worker_generate":
            params = loads(body)
            async with self.semaphore:
                reply = self.generate(params)
        elif path == "/worker_get_embeddings":
            params = loads(body)
            async with self.semaphore:
                reply = self.embeddings(params)
        elif path == "/count_token":
            params = loads(body)
            reply = dumps({"count": len(str(params.get("prompt", "")).split()), "error_code": 0})
        elif path == "/model_details":
            reply = self.details_json
        elif path == "/worker_get_conv_template":
            reply = self.conv_json
        elif path == "/worker_get_status":
            reply = dumps(self.status())
        else:
            await _respond(send, 404, b'{"detail":"Not Found"}')
            return
        await _respond(send, 200, reply)

    # -- controller link -------------------------------------------------------------------

    def _post(self, path: str, payload: dict[str, Any], timeout: float = 5.0) -> Any:
        request = urllib.request.Request(
            self.args.controller_address + path,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read() or b"null")

    def register(self) -> None:
        self._post(
            "/register_worker",
            {
                "worker_name": self.address,
                "check_heart_beat": True,
                "worker_status": self.status(),
                "multimodal": False,
            },
        )

    def heartbeat_forever(self) -> None:
        while True:
            time.sleep(self.args.heartbeat_interval)
            try:
                reply = self._post(
                    "/receive_heart_beat", {"worker_name": self.address, "queue_length": self.queue_length()}
                )
                if not reply.get("exist"):
                    self.register()
            except Exception as error:  # the controller may be restarting: keep going, like FastChat
                print(f"heart beat error: {error}", file=sys.stderr, flush=True)


async def _respond(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--controller-address", default="http://127.0.0.1:21001")
    parser.add_argument("--model-name", default="echo-chat")
    parser.add_argument("--tokens", type=int, default=256, help="most tokens per answer (fewer if max_tokens says so)")
    parser.add_argument("--words", default="Hello from the benchmark, how are you today?")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per streamed token, like --echo-delay")
    parser.add_argument("--dimensions", type=int, default=384)
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--limit-worker-concurrency", type=int, default=1024)
    parser.add_argument("--heartbeat-interval", type=float, default=45.0)
    parser.add_argument("--no-register", action="store_true")
    args = parser.parse_args()

    import uvicorn

    sock = socket.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    address = f"http://{args.host}:{port}"

    async def serve() -> None:
        worker = FakeWorker(args, address)
        config = uvicorn.Config(worker, loop="uvloop", http="httptools", log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if not args.no_register:
            await asyncio.to_thread(worker.register)
            threading.Thread(target=worker.heartbeat_forever, daemon=True).start()
        print(f"READY fake-worker {args.host}:{port}", flush=True)
        await task

    import uvloop

    uvloop.run(serve())


if __name__ == "__main__":
    main()
