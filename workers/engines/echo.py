"""The echo engine: a deterministic, instant test double. Never the product.

Its output is derived from the request so that tests can predict it: the
words of the last message (or prompt) repeated, starting at an offset given by
the choice index, one word per token, as many as ``--echo-tokens`` (or fewer
when max_tokens says so). Tokens are whitespace-separated words. A per-token
delay makes streams slow enough to cancel mid-way. Stop strings are cut by the
code the llama_cpp engine uses (:mod:`workers.engines.stop_strings`), so tests
on echo exercise it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from common import errors
from common.settings import FlagAdder
from tokenwire.v1 import common_pb2, worker_pb2
from workers.engine import Delta, Engine, Generation, Prepared, check_token_ids, iterate_in_task, message_text
from workers.engines.stop_strings import ChoiceText

VOCAB_SIZE = 32000


def token_id(word: str) -> int:
    return zlib.crc32(word.encode()) % VOCAB_SIZE


class EchoEngine(Engine):
    def __init__(
        self,
        model: str,
        *,
        kind: int = common_pb2.MODEL_KIND_CHAT,
        tokens: int = 16,
        delay: float = 0.0,
        context_length: int = 2048,
        dimensions: int = 16,
    ) -> None:
        self.info = common_pb2.ModelInfo(
            name=model,
            kind=kind,  # type: ignore[arg-type]
            context_length=context_length,
            engine="echo",
            dimensions=dimensions if kind == common_pb2.MODEL_KIND_EMBEDDING else 0,
        )
        self.tokens = tokens
        self.delay = delay

    # The "template": one line per message.
    def render(self, messages: Sequence[common_pb2.ChatMessage]) -> str:
        return "\n".join(f"{m.role}: {message_text(m)}" for m in messages)

    def _words(self, prompt: str | None, messages: Sequence[common_pb2.ChatMessage]) -> list[str]:
        return (prompt if prompt is not None else self.render(messages)).split()

    async def prepare(self, request: worker_pb2.GenerateRequest) -> Prepared:
        if request.messages:
            words = self._words(None, request.messages)
            source = message_text(request.messages[-1]).split()
            return Prepared(prompt_tokens=len(words), param="messages", state=(source, []))
        if request.prompt.HasField("tokens"):
            ids = list(request.prompt.tokens.ids)
            return Prepared(prompt_tokens=len(ids), param="prompt", state=([str(i) for i in ids], ids))
        words = request.prompt.text.split()
        return Prepared(prompt_tokens=len(words), param="prompt", state=(words, words))

    def generate(
        self, request: worker_pb2.GenerateRequest, prepared: Prepared, max_tokens: int | None, generation: Generation
    ) -> AsyncGenerator[list[Delta], None]:
        # In a task of its own, as a real engine's compute loop: only the cancel flag stops it.
        return iterate_in_task(lambda: self._produce(request, prepared, max_tokens, generation), generation)

    async def _produce(
        self, request: worker_pb2.GenerateRequest, prepared: Prepared, max_tokens: int | None, generation: Generation
    ) -> AsyncIterator[Delta]:
        source, echoed = prepared.state
        source = source or ["echo"]
        if request.echo and echoed:
            pieces = [str(w) if i == 0 else f" {w}" for i, w in enumerate(echoed)]
            yield Delta(text="".join(pieces), logprobs=self._logprobs(pieces, request, first_is_prompt=True), tokens=0)
        if max_tokens is None and self.info.context_length:  # unset: up to the end of the context
            max_tokens = self.info.context_length - prepared.prompt_tokens
        count = self.tokens if max_tokens is None else min(self.tokens, max_tokens)
        text = ChoiceText(request.sampling.stop)
        for i in range(count):
            if self.delay:
                await asyncio.sleep(self.delay)
            if generation.cancelled.is_set():
                return
            word = source[(i + request.index) % len(source)]
            piece = word if i == 0 and not (request.echo and echoed) else " " + word
            generation.produced()
            logprobs = self._logprobs([piece], request) if request.logprobs else []
            deltas, stopped = text.token(piece, token_id(word), logprobs)
            for delta in deltas:
                yield delta
            if stopped:
                return
        for delta in text.end("length" if count == max_tokens else "stop"):
            yield delta

    def _logprobs(
        self, pieces: Sequence[str], request: worker_pb2.GenerateRequest, first_is_prompt: bool = False
    ) -> list[common_pb2.TokenLogprob]:
        if not request.logprobs:
            return []
        out = []
        for i, piece in enumerate(pieces):
            entry = common_pb2.TokenLogprob(token=piece, bytes=piece.encode())
            if not (first_is_prompt and i == 0):
                entry.logprob = -0.5
            for k in range(request.top_logprobs):
                entry.top_logprobs.add(token=f"{piece}#{k}", logprob=-0.5 - k, bytes=f"{piece}#{k}".encode())
            out.append(entry)
        return out

    async def embed(
        self, inputs: Sequence[common_pb2.TextOrTokens], dimensions: int | None
    ) -> tuple[list[list[float]], int]:
        if self.info.kind != common_pb2.MODEL_KIND_EMBEDDING:
            raise errors.wrong_model_kind(self.info.name, "embeddings")
        size = dimensions or self.info.dimensions
        if size > self.info.dimensions:
            raise errors.invalid_request(
                f"dimensions must be at most {self.info.dimensions} for this model.", param="dimensions"
            )
        vectors, tokens = [], 0
        for item in inputs:
            text = item.text if item.HasField("text") else " ".join(map(str, item.tokens.ids))
            tokens += len(text.split()) if item.HasField("text") else len(item.tokens.ids)
            digest = hashlib.sha256(text.encode()).digest()
            raw = [(digest[i % len(digest)] - 127.5) / 127.5 for i in range(size)]
            norm = math.sqrt(sum(v * v for v in raw)) or 1.0
            vectors.append([v / norm for v in raw])
        return vectors, tokens

    async def tokenize(
        self, prompt: str | None, messages: Sequence[common_pb2.ChatMessage], add_special_tokens: bool | None = None
    ) -> list[int]:
        return [token_id(w) for w in self._words(prompt, messages)]

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        # Word ids are hashes: an id reads back as its number, as prompt token ids do here.
        check_token_ids(token_ids, VOCAB_SIZE)
        return " ".join(str(i) for i in token_ids)


def add_arguments(group: FlagAdder) -> None:
    group.add_argument("--echo-tokens", type=int, default=16, help="tokens per choice (fewer if max_tokens says so)")
    group.add_argument("--echo-delay", type=float, default=0.0, help="seconds per token")
    group.add_argument("--echo-context-length", type=int, default=2048)
    group.add_argument("--echo-kind", choices=("chat", "embedding"), default="chat")
    group.add_argument("--echo-dimensions", type=int, default=16, help="embedding size")


def build(args: argparse.Namespace) -> EchoEngine:
    kind = common_pb2.MODEL_KIND_EMBEDDING if args.echo_kind == "embedding" else common_pb2.MODEL_KIND_CHAT
    return EchoEngine(
        args.model_name or f"echo-{args.echo_kind}",
        kind=kind,
        tokens=args.echo_tokens,
        delay=args.echo_delay,
        context_length=args.echo_context_length,
        dimensions=args.echo_dimensions,
    )
