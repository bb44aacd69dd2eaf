"""A small OpenAI-compatible upstream that can be told to ignore parameters.

Run as a process (``python -m tests.fake_upstream --ignore echo``): it listens
on 127.0.0.1, port 0, and prints ``READY 127.0.0.1:<port>``. Its "model" is a
toy: words drawn from a short list, one word a token, a token a streamed chunk,
and a whitespace tokenizer (vLLM's ``/tokenize`` and ``/detokenize``). It
honours every parameter the openai engine probes for, except the ones named
with ``--ignore``, which it drops silently, as real upstreams do.
``GET /_traceparents`` lists the ``traceparent`` header of each generation request.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

IGNORABLE = (
    "echo",  # completions echo
    "logprobs",  # completions logprobs
    "chat_logprobs",
    "top_logprobs",  # chat's alternatives (logprobs themselves still come)
    "n",
    "include_usage",
    "response_format",
    "tools",
    "seed",
    "tokenize",  # no /tokenize or /detokenize
)
WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "maple",
    "ember",
    "harbor",
    "violet",
    "cobalt",
    "meadow",
    "quartz",
    "lantern",
)
DEFAULT_TOKENS = 8  # what it writes when max_tokens is unset; then finish_reason is "stop"
CONTEXT = 4096

_vocab: dict[str, int] = {}
# The W3C traceparent header of each generation request (None: it had none), at GET /_traceparents.
_traceparents: list[str | None] = []
_lock = threading.Lock()


def token_id(word: str) -> int:
    with _lock:
        return _vocab.setdefault(word, len(_vocab) + 1)


def word_of(token: int) -> str:
    with _lock:
        return next((w for w, i in _vocab.items() if i == token), f"<{token}>")


class Handler(BaseHTTPRequestHandler):
    ignored: frozenset[str] = frozenset()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/_traceparents":  # for the tests of trace propagation
            with _lock:
                seen = list(_traceparents)
            self._json(200, seen)
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake", "object": "model", "max_model_len": CONTEXT}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        if self.path in ("/tokenize", "/detokenize") and "tokenize" not in self.ignored:
            if self.path == "/tokenize":
                text = body.get("prompt")
                if text is None:
                    text = " ".join(m.get("content") or "" for m in body.get("messages") or [])
                tokens = [token_id(w) for w in text.split()]
                self._json(200, {"count": len(tokens), "tokens": tokens, "max_model_len": CONTEXT})
            else:
                self._json(200, {"prompt": " ".join(word_of(t) for t in body.get("tokens") or [])})
        elif self.path in ("/v1/completions", "/v1/chat/completions"):
            with _lock:
                _traceparents.append(self.headers.get("traceparent"))
            self._stream(body, chat=self.path.endswith("/chat/completions"))
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    # -- generation --

    def _honours(self, name: str) -> bool:
        return name not in self.ignored

    def _stream(self, body: dict[str, Any], chat: bool) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        n = int(body.get("n") or 1) if self._honours("n") else 1
        seed = body.get("seed") if self._honours("seed") else None
        prompt_tokens = self._prompt_tokens(body, chat)
        completion_tokens = 0
        for index in range(n):
            rng = random.Random(None if seed is None else seed + index)
            completion_tokens += self._choice(body, chat, index, rng)
        if body.get("stream_options", {}).get("include_usage") and self._honours("include_usage"):
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            self._event({"id": "x", "object": "chunk", "choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")

    def _prompt_tokens(self, body: dict[str, Any], chat: bool) -> int:
        if chat:
            return sum(len(str(m.get("content") or "").split()) for m in body.get("messages") or [])
        prompt = body.get("prompt")
        return len(prompt) if isinstance(prompt, list) else len(str(prompt).split())

    def _event(self, chunk: dict[str, Any]) -> None:
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()

    def _send(self, chat: bool, index: int, text: str, logprobs: Any = None, finish: str | None = None) -> None:
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish}
        if chat:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["text"] = text
        self._event({"id": "x", "object": "chunk", "choices": [choice]})

    def _logprobs(self, body: dict[str, Any], chat: bool, word: str, offset: int, first_prompt: bool = False) -> Any:
        alternatives = [w for w in WORDS if w != word.strip()]
        if chat:
            if not (body.get("logprobs") and self._honours("chat_logprobs")):
                return None
            k = int(body.get("top_logprobs") or 0) if self._honours("top_logprobs") else 0
            top = [{"token": word, "logprob": -0.5, "bytes": list(word.encode())}]
            top += [
                {"token": " " + w, "logprob": -2.0 - i, "bytes": list((" " + w).encode())}
                for i, w in enumerate(alternatives)
            ]
            entry = {"token": word, "logprob": -0.5, "bytes": list(word.encode()), "top_logprobs": top[:k]}
            return {"content": [entry]}
        if body.get("logprobs") is None or not self._honours("logprobs"):
            return None
        k = int(body["logprobs"])
        top = {word: -0.5, **{" " + w: -2.0 - i for i, w in enumerate(alternatives)}}
        return {
            "tokens": [word],
            "token_logprobs": [None if first_prompt else -0.5],
            "top_logprobs": [None if first_prompt else dict(list(top.items())[:k])],
            "text_offset": [offset],
        }

    def _choice(self, body: dict[str, Any], chat: bool, index: int, rng: random.Random) -> int:
        """Stream one choice; return its completion tokens."""
        offset = 0
        if not chat and body.get("echo") and self._honours("echo"):
            prompt = body["prompt"]
            words = prompt.split() if isinstance(prompt, str) else [word_of(t) for t in prompt]
            for i, word in enumerate(words):
                piece = word if i == 0 else " " + word
                self._send(chat, index, piece, self._logprobs(body, chat, piece, offset, first_prompt=i == 0))
                offset += len(piece)
        tools = body.get("tools") if self._honours("tools") else None
        choice = body.get("tool_choice")
        if tools and choice != "none":
            name = choice["function"]["name"] if isinstance(choice, dict) else tools[0]["function"]["name"]
            call = {"index": 0, "id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": ""}}
            self._tool_delta(index, call)
            for part in ('{"x": ', "1}"):
                self._tool_delta(index, {"index": 0, "function": {"arguments": part}})
            self._send(chat, index, "", finish="tool_calls")
            return 3
        fmt = (body.get("response_format") or {}) if self._honours("response_format") else {}
        if fmt.get("type") == "json_object":
            pieces = ['{"answer":', ' "yes"}']
        elif fmt.get("type") == "json_schema":
            prop = next(iter(fmt["json_schema"]["schema"].get("properties") or {"answer": {}}))
            pieces = ['{"' + prop + '":', " 0}"]
        else:
            pieces = [" " + rng.choice(WORDS) for _ in range(DEFAULT_TOKENS)]
        limit = body.get("max_tokens")
        finish = "stop"
        if limit is not None and limit < len(pieces):
            pieces, finish = pieces[:limit], "length"
        elif limit is not None and limit == len(pieces) and not fmt:
            finish = "length"
        for piece in pieces:
            self._send(chat, index, piece, self._logprobs(body, chat, piece, offset))
            offset += len(piece)
        self._send(chat, index, "", finish=finish)
        return len(pieces)

    def _tool_delta(self, index: int, call: dict[str, Any]) -> None:
        self._event({"id": "x", "object": "chunk", "choices": [{"index": index, "delta": {"tool_calls": [call]}}]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ignore", action="append", default=[], choices=IGNORABLE)
    args = parser.parse_args()
    handler = type("FakeHandler", (Handler,), {"ignored": frozenset(args.ignore)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    host, port = server.server_address[:2]
    print(f"READY {host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
