"""The engine interface a worker hosts, and the helpers engines share.

A worker serves one model through one :class:`Engine`. The worker owns
admission, the context-length check, cancellation accounting and the gRPC
plumbing; an engine only knows its model:

* :meth:`Engine.prepare` renders chat messages with the model's own template
  and tokenizes the prompt (the worker then checks prompt + max_tokens against
  ``info.context_length``);
* :meth:`Engine.generate` yields lists of :class:`Delta` objects for one choice:
  each list is what was ready at that moment (a llama.cpp step's tokens, or what a
  fast producer made while the worker was sending), and becomes one message;
* :meth:`Engine.embed` and :meth:`Engine.tokenize` do what they say.

Blocking engines (llama.cpp, torch) must keep the event loop free: they run
the blocking part with :func:`run_blocking` (llama.cpp: on its one compute
thread, whose batch scheduler checks each sequence's cancel flag every step).
An engine that runs on the event loop generates through
:func:`iterate_in_task`, which stops it by the same flag.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from common import errors
from tokenwire.v1 import common_pb2, worker_pb2

T = TypeVar("T")


@dataclass
class Delta:
    """One step of a generation: new text, the tokens behind it, and the end."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    # "", "stop", "length" or "tool_calls".
    finish_reason: str = ""
    tool_calls: list[common_pb2.ToolCall] = field(default_factory=list)
    # Completion tokens this delta accounts for (defaults to len(token_ids),
    # or 1 for an engine that does not expose ids).
    tokens: int | None = None
    # What the engine learnt of the prompt by the end (on the last delta): its tokens as an
    # upstream counted them (None: prepare's count stands), and those taken from a prefix cache
    # rather than evaluated (None: the engine cannot tell).
    prompt_tokens: int | None = None
    cached_tokens: int | None = None

    @property
    def token_count(self) -> int:
        if self.tokens is not None:
            return self.tokens
        return len(self.token_ids) if self.token_ids else (1 if self.text else 0)


@dataclass
class Prepared:
    """A request accepted by the engine: its prompt, tokenized."""

    prompt_tokens: int
    # The parameter named in a context-length error: "messages" or "prompt".
    param: str = "messages"
    # Engine-specific state carried from prepare() to generate().
    state: Any = None


class Generation:
    """Per-call state shared between the worker and the engine.

    The worker sets :attr:`cancelled` when the caller goes away; the engine
    calls :meth:`produced` for every token it makes, so the worker can report
    how many tokens were made after the cancel (the goal is at most one).
    :attr:`whole` says nobody streams this choice (``GenerateChoice``): an
    engine may hand it over once, when it is done.
    """

    __slots__ = ("cancelled", "tokens", "tokens_after_cancel", "whole")

    def __init__(self, whole: bool = False) -> None:
        self.whole = whole
        self.cancelled = threading.Event()
        self.tokens = 0
        self.tokens_after_cancel = 0

    def produced(self, n: int = 1) -> None:
        self.tokens += n
        if self.cancelled.is_set():
            self.tokens_after_cancel += n


@dataclass
class BatchStats:
    """Counters of an engine that batches sequences, read by GetStats and the metrics."""

    parallel: int = 0
    running: int = 0
    waiting: int = 0
    steps: int = 0
    step_tokens_total: int = 0
    # The most sequences and tokens one decode step carried.
    max_sequences_per_step: int = 0
    max_tokens_per_step: int = 0
    prompt_tokens_evaluated: int = 0
    prompt_tokens_reused: int = 0
    kv_cells_in_use: int = 0
    kv_cells_cached: int = 0
    kv_exhausted_total: int = 0
    # Batch sequences ended to free a sequence id for an interactive one (--batch-yield preempt).
    batch_preempted_total: int = 0
    # Decode steps of batch sequences alone stopped for an interactive request (--batch-yield preempt).
    batch_steps_aborted_total: int = 0
    prompt_cache_bytes: int = 0
    # Called with (sequences, tokens) after every decode step, on the engine's thread.
    on_step: list[Callable[[int, int], None]] = field(default_factory=list)


def message_text(message: common_pb2.ChatMessage) -> str:
    """A message's text: its content, or its text parts joined by spaces."""
    if message.HasField("content_parts"):
        return " ".join(part.text for part in message.content_parts.parts if part.type == "text")
    return message.content


class Engine(abc.ABC):
    """One model. Subclasses set :attr:`info` (name, kind, context length)."""

    info: common_pb2.ModelInfo

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load the model. Runs before the worker registers."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model and any clients."""

    @abc.abstractmethod
    async def prepare(self, request: worker_pb2.GenerateRequest) -> Prepared:
        """Render and tokenize the request's prompt; raise ApiError on bad input."""

    @abc.abstractmethod
    def generate(
        self, request: worker_pb2.GenerateRequest, prepared: Prepared, max_tokens: int | None, generation: Generation
    ) -> AsyncGenerator[list[Delta], None]:
        """Yield the deltas of one choice, in lists of what is ready (never empty);
        the last delta carries finish_reason.

        ``max_tokens`` is the worker's decision (workers/admission.py): the request's
        value, else what is left of the context; None only when the model's context
        is unknown (an upstream's own limit applies).
        """

    async def embed(
        self, inputs: Sequence[common_pb2.TextOrTokens], dimensions: int | None
    ) -> tuple[list[list[float]], int]:
        """Return one vector per input and the number of prompt tokens."""
        raise errors.wrong_model_kind(self.info.name, "embeddings")

    def batch_stats(self) -> BatchStats | None:
        """The batching counters of an engine that batches sequences (None: it does not)."""
        return None

    @abc.abstractmethod
    async def tokenize(
        self,
        prompt: str | None,
        messages: Sequence[common_pb2.ChatMessage],
        add_special_tokens: bool | None = None,
    ) -> list[int]:
        """Token ids of a prompt, or of messages rendered with the chat template.

        ``add_special_tokens`` None is what generation sees (the engine's own
        choice); True or False is what a /tokenize caller asked for.
        """

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of token ids (special tokens written out); 400 outside the vocabulary."""
        raise errors.ApiError(grpc.StatusCode.UNIMPLEMENTED, f"The model `{self.info.name}` cannot detokenize.")


def check_token_ids(token_ids: Iterable[int], vocab_size: int, param: str = "tokens") -> None:
    """Refuse ids outside ``0..vocab_size-1`` with a 400 naming the first one."""
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise errors.invalid_request(
            f"Token id {bad} is outside this model's vocabulary (0-{vocab_size - 1}).", param=param
        )


# -- Running blocking engines off the event loop ----------------------------

_executor: ThreadPoolExecutor | None = None


def executor() -> ThreadPoolExecutor:
    """The worker's thread pool for blocking engine calls."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="engine")
    return _executor


def compute_thread(name: str) -> ThreadPoolExecutor:
    """One thread for every call into a model's compute backend.

    llama.cpp's CPU backend parallelises with OpenMP, which keeps a team of
    threads per calling thread: once a second thread of the shared pool
    called in, the teams competed for the cores and decoding ran 20% slower
    from then on (112 -> 87-92 tok/s, SmolLM2 on 2 cores). One caller keeps
    one team. (torch showed no such effect: its forward passes ran as fast
    from a pool of threads as from one.)
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


async def run_blocking(fn: Callable[..., T], *args: Any, pool: Executor | None = None) -> T:
    """Run ``fn(*args)`` on ``pool`` (default: the engine thread pool)."""
    return await asyncio.get_running_loop().run_in_executor(pool or executor(), fn, *args)


_DONE = object()


async def iterate_in_task(
    produce: Callable[[], AsyncIterator[T]], generation: Generation
) -> AsyncGenerator[list[T], None]:
    """Drive an async producer in a task of its own and yield here, in lists,
    what it made since the last time this was asked.

    For engines that run on the event loop. The producer is not cancelled with
    its consumer: like a compute loop on a thread, it must see
    ``generation.cancelled`` and stop by itself, and the tokens it makes
    meanwhile count as made after the cancel. When the consumer stops, this sets
    the flag and waits for the producer to finish.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in produce():
                queue.put_nowait(item)
        except BaseException as exc:  # handed to the consumer
            queue.put_nowait(exc)
            return
        queue.put_nowait(_DONE)

    task = asyncio.ensure_future(pump())
    try:
        while True:
            ready = [await queue.get()]
            while not queue.empty():
                ready.append(queue.get_nowait())
            end = ready.pop() if ready[-1] is _DONE or isinstance(ready[-1], BaseException) else None
            if ready:
                yield ready
            if end is _DONE:
                return
            if end is not None:
                raise end
    finally:
        generation.cancelled.set()
        await asyncio.shield(task)
