"""The batch runner: validates input files, runs their requests on free capacity, writes the results.

It lives in the gateway because the gateway has what it needs: the dispatch (each
request is an ordinary call of :class:`gateway.inference.Inference`, marked
``PRIORITY_BATCH`` for the workers) and the live view of every worker's load.
The store (:mod:`gateway.batches.store`) is its only state, so a restart resumes
where the last committed result left off.

Feeding: a model's batch requests run only while its workers have a free slot,
counted from the gateway's own in-flight calls and the heartbeats' queues; what
room interactive requests keep beyond that is each worker's business (its
``--reserved-slots``, or the llama.cpp engine's preemption of batch sequences), and
a batch call the worker does not start at once waits behind every interactive one.
Nothing is queued on a worker ahead of people. A request the cluster cannot take
now (429, no live worker, preempted) stays pending and is tried again; any other
error is its result, a line of the error file.

Each batch's next pending requests are read from the store ahead, a page at a
time, so the pass that follows a finished request (it wakes the runner) refills
the freed slot from memory: no query, no parse, no count on that path. A request
is in one place at a time: read ahead, running, or committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import shortuuid

from common import errors, openai_objects, openai_requests
from common.responses_output import Turn, from_completion, new_id
from common.responses_request import parse_request
from gateway import metrics
from gateway.auth import ApiKeys
from gateway.batches.storage import BatchStorage, Request, store_down
from gateway.dispatch import current_priority
from gateway.inference import Inference
from gateway.rate_limits import RateLimiter
from tokenwire.v1 import worker_pb2

log = logging.getLogger("tokenwire.gateway.batch")

WINDOWS = {"24h": 24 * 3600}
# How long one batch request may run (a stuck worker must not hold a batch forever).
REQUEST_TIMEOUT = 3600.0
# Re-reading the workers' load while a batch waits for capacity.
POLL = 0.2
IDLE_POLL = 1.0
# Pending requests read from the store at once, ahead of the free slots.
READ_AHEAD = 64
# How often the per-batch progress metrics are counted (a count reads every request's row).
PROGRESS_EVERY = 1.0
MAX_REPORTED_PROBLEMS = 100


@dataclass(frozen=True)
class BatchLimits:
    max_file_bytes: int = 100 * 1024 * 1024
    max_lines: int = 50_000
    # How long the "24h" completion window lasts (--batch-window-seconds; tests shorten it).
    window_seconds: int = WINDOWS["24h"]


# -- one request -------------------------------------------------------------


async def _chat(inference: Inference, body: dict[str, Any]) -> dict[str, Any]:
    return openai_objects.chat_completion(await inference.chat(openai_requests.chat_request(body), REQUEST_TIMEOUT))


async def _completion(inference: Inference, body: dict[str, Any]) -> dict[str, Any]:
    reply = await inference.completion(openai_requests.completion_request(body), REQUEST_TIMEOUT)
    return openai_objects.completion(reply)


async def _embedding(inference: Inference, body: dict[str, Any]) -> dict[str, Any]:
    message = openai_requests.embedding_request(body)
    return openai_objects.embeddings(await inference.embed(message, REQUEST_TIMEOUT), message.encoding_format)


async def _response(inference: Inference, body: dict[str, Any]) -> dict[str, Any]:
    if body.get("previous_response_id") is not None:
        raise errors.invalid_request("'previous_response_id' is not supported in a batch.", "previous_response_id")
    parsed = parse_request(body, None)
    reply = await inference.chat(openai_requests.chat_request(parsed.chat), REQUEST_TIMEOUT)
    return from_completion(Turn(new_id("resp"), int(time.time()), parsed.echo), reply).response()


ENDPOINTS: dict[str, Callable[[Inference, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "/v1/chat/completions": _chat,
    "/v1/completions": _completion,
    "/v1/embeddings": _embedding,
    "/v1/responses": _response,
}


async def execute(inference: Inference, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """One batch request, at batch priority: its response body, or an ApiError."""
    if openai_requests.stream_flag(body):
        raise errors.invalid_request("'stream' is not supported in a batch.", "stream")
    current_priority.set(worker_pb2.PRIORITY_BATCH)  # this task's context only
    return await ENDPOINTS[endpoint](inference, body)


def _transient(error: errors.ApiError) -> bool:
    """The cluster cannot take it now (full, no live worker): try again later, not a result."""
    return error.http_status in (429, 503)


def output_line(custom_id: str, status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    """A line of the output or error file, OpenAI's ``BatchRequestOutput``."""
    return {
        "id": f"batch_req_{shortuuid.uuid()}",
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": shortuuid.uuid(), "body": body},
        "error": None,
    }


# -- validation --------------------------------------------------------------


def validate(content: bytes, endpoint: str, max_lines: int) -> tuple[list[tuple[int, str, str]], list[dict[str, Any]]]:
    """The input file's requests (line, custom_id, body JSON), or the problems that fail the batch.

    The file's shape is checked here (OpenAI's validation step); what a request's
    body asks for (its model, its parameters) is checked when it runs, and a bad
    one becomes a line of the error file.
    """
    requests: list[tuple[int, str, str]] = []
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()

    def problem(line: int, code: str, message: str, param: str | None = None) -> None:
        problems.append({"code": code, "message": message, "param": param, "line": line})

    for number, raw in enumerate(content.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError:
            problem(number, "invalid_json_line", f"Line {number} is not valid JSON.")
            continue
        if not isinstance(item, dict):
            problem(number, "invalid_json_line", f"Line {number} is not a JSON object.")
            continue
        custom_id, body = item.get("custom_id"), item.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            problem(number, "missing_required_parameter", "Each line needs a string 'custom_id'.", "custom_id")
        elif custom_id in seen:
            problem(number, "duplicate_custom_id", f"The custom_id '{custom_id}' is used more than once.", "custom_id")
        elif item.get("method") != "POST":
            problem(number, "invalid_request", "'method' must be POST.", "method")
        elif item.get("url") != endpoint:
            problem(number, "invalid_url", f"'url' must be the batch's endpoint, {endpoint}.", "url")
        elif not isinstance(body, dict):
            problem(number, "invalid_request", "'body' must be a JSON object.", "body")
        else:
            seen.add(custom_id)
            requests.append((number, custom_id, json.dumps(body)))
    if len(requests) > max_lines:
        problem(0, "too_many_requests", f"A batch holds at most {max_lines} requests; this file has {len(requests)}.")
    if not requests and not problems:
        problem(0, "empty_file", "The input file has no requests.")
    return requests, problems[:MAX_REPORTED_PROBLEMS]


# -- the runner --------------------------------------------------------------


class BatchRunner:
    def __init__(
        self,
        store: BatchStorage,
        inference: Inference,
        keys: ApiKeys,
        limiter: RateLimiter,
        limits: BatchLimits,
        expected_models: list[str] | None = None,
    ) -> None:
        self.store = store
        # Nothing runs before the gateway is ready (each of --expect-models, else some model, has a
        # live worker): after a restart, a model whose worker has not registered yet is not unknown.
        self.expected_models = expected_models or []
        self.inference = inference
        self.keys = keys
        self.limiter = limiter
        self.limits = limits
        # batch id -> custom_id -> the task running it
        self._running: dict[str, dict[str, asyncio.Task[None]]] = {}
        # batch id -> its next pending requests (none of them running), in file order
        self._ahead: dict[str, deque[Request]] = {}
        self._counted: dict[str, float] = {}  # batch id -> when its progress metrics were last counted
        self._wake = asyncio.Event()
        self._retry_at: dict[str, float] = {}  # model -> when to try again after a transient refusal

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, batch_id: str) -> None:
        """Stop a batch's running requests (their results are not kept; those made are)."""
        for task in self._running.get(batch_id, {}).values():
            task.cancel()
        self.wake()

    async def run(self) -> None:
        try:
            while True:
                self._wake.clear()
                busy = False
                room: dict[str, int] = {}  # model -> batch calls it can take now, shared by the batches
                # Unclaimed: another gateway runs the batches (until it ends, or its lease runs out).
                try:
                    claimed = self.store.claim()
                    if not claimed:  # another gateway runs them now: what was read ahead here may run there
                        self._ahead.clear()
                    for batch in self.store.active() if claimed else []:
                        busy = self._advance(batch, room) or busy
                except errors.ApiError as error:
                    if not store_down(error):
                        raise
                    busy = False  # the shared store is down: look again later, from where its results stop
                # Idle, a batch created by another gateway sharing the directory is found within IDLE_POLL.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL if busy else IDLE_POLL)
        finally:
            tasks = [t for running in self._running.values() for t in running.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _advance(self, batch: Any, room: dict[str, int]) -> bool:
        """One look at a batch: whether it still has work."""
        batch_id, status = batch["id"], batch["status"]
        running = self._running.setdefault(batch_id, {})
        if status == "validating":
            self._validate(batch)
            self.wake()  # its requests start at the next pass, not a poll later
            return True
        if status == "in_progress" and time.time() >= batch["expires_at"]:
            self.store.set_status(batch_id, "cancelling")  # stop as a cancel does, then expire
            self.cancel(batch_id)
            status = "expiring"
        if status == "in_progress":
            ahead = self._feed(batch, running, room)
            if time.monotonic() - self._counted.get(batch_id, 0.0) >= PROGRESS_EVERY:
                self._count(batch_id)
            if running or ahead:
                return True
            self.store.set_status(batch_id, "finalizing")
        if running:  # cancelling: wait for the cancelled requests to leave
            if status == "cancelling":  # cancelled through another gateway, or before a restart
                for task in running.values():
                    task.cancel()
            return True
        expired = status == "expiring" or (status == "cancelling" and time.time() >= batch["expires_at"])
        final = "completed" if status in ("in_progress", "finalizing") else "expired" if expired else "cancelled"
        self._finalize(batch, final)
        del self._running[batch_id]
        self._ahead.pop(batch_id, None)
        self._counted.pop(batch_id, None)
        for state in ("completed", "failed", "pending"):
            with contextlib.suppress(KeyError):
                metrics.BATCH_PROGRESS.remove(batch_id, state)
        return False

    def _validate(self, batch: Any) -> None:
        try:
            content = self.store.content(batch["owner"], batch["input_file_id"])
        except errors.ApiError as error:
            if store_down(error):
                raise
            self.store.fail(batch["id"], [{"code": "file_not_found", "message": "The input file was deleted."}])
            return
        requests, problems = validate(content, batch["endpoint"], self.limits.max_lines)
        if problems:
            self.store.fail(batch["id"], problems)
            log.info("batch %s failed validation: %d problems", batch["id"], len(problems))
        else:
            self.store.start(batch["id"], requests)
            log.info("batch %s: %d requests", batch["id"], len(requests))

    def _free_slots(self, model: str) -> int:
        """Batch calls this model's workers can take now beside what they run (each keeps its own reserve)."""
        workers = self.inference.pool.workers(model)
        return max(sum(w.status.capacity - w.calls() for w in workers), 0)

    def _count(self, batch_id: str) -> None:
        self._counted[batch_id] = time.monotonic()
        for state, count in self.store.counts(batch_id).items():
            metrics.BATCH_PROGRESS.labels(batch_id, state).set(count)

    def _feed(self, batch: Any, running: dict[str, asyncio.Task[None]], room: dict[str, int]) -> bool:
        """Start what the free slots take; whether requests are still pending beside those running."""
        ahead = self._ahead.setdefault(batch["id"], deque())
        if not ahead:  # read only now: none of these is running, and none can be in two places
            ahead.extend(self.store.pending(batch["id"], READ_AHEAD, set(running)))
        if not self.inference.pool.ready(self.expected_models):
            return bool(ahead)
        now = time.monotonic()
        waiting: deque[Request] = deque()  # their model has no room now: first in line next time
        for request in ahead:
            model = request.body.get("model")
            if not isinstance(model, str) or model not in self.inference.pool.known_models():
                room[str(model)] = 1  # refused at once (404, 400): no slot used
            elif model not in room:
                room[model] = 0 if self._retry_at.get(model, 0) > now else self._free_slots(model)
            if room[str(model)] <= 0:
                waiting.append(request)
                continue
            room[str(model)] -= 1
            task = asyncio.create_task(self._run_one(batch, request, str(model)))
            running[request.custom_id] = task
        self._ahead[batch["id"]] = ahead = waiting
        return bool(ahead)

    async def _run_one(self, batch: Any, request: Request, model: str) -> None:
        try:
            body = await execute(self.inference, batch["endpoint"], request.body)
            ok, line = True, output_line(request.custom_id, 200, body)
            text = orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY).decode()  # embeddings are numpy arrays
        except errors.ApiError as error:
            if _transient(error):
                self._retry_at[model] = time.monotonic() + 1.0
                if batch["id"] in self._ahead:  # pending still: first in line again
                    self._ahead[batch["id"]].appendleft(request)
                return
            ok, line = False, output_line(request.custom_id, error.http_status, error.envelope())
            text = orjson.dumps(line).decode()
        except Exception:
            log.exception("batch %s: request %s failed", batch["id"], request.custom_id)
            ok, line = False, output_line(request.custom_id, 500, errors.internal().envelope())
            text = orjson.dumps(line).decode()
        finally:
            self._running.get(batch["id"], {}).pop(request.custom_id, None)
            self.wake()
        try:
            if not self.store.commit(request, ok, text):
                return
        except errors.ApiError as error:
            if store_down(error):  # still pending: it runs again once the store is back
                return
            raise
        metrics.BATCH_REQUESTS.labels("completed" if ok else "failed").inc()
        tokens = (line["response"]["body"].get("usage") or {}).get("total_tokens", 0) if ok else 0
        if tokens:
            metrics.BATCH_TOKENS.inc(tokens)
            key = self.keys.by_id(batch["owner"])
            if key is not None:
                self.limiter.record(key, tokens)

    def _finalize(self, batch: Any, status: str) -> None:
        """Write the output and error files, then the final status (redone whole after a crash)."""
        batch_id, owner = batch["id"], batch["owner"]
        if batch["status"] != "finalizing" and status == "completed":
            self.store.set_status(batch_id, "finalizing")
        files: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        failed = self.store.results(batch_id, "failed")
        if status == "expired":
            failed += [
                json.dumps(
                    {
                        "id": f"batch_req_{shortuuid.uuid()}",
                        "custom_id": r.custom_id,
                        "response": None,
                        "error": {
                            "code": "batch_expired",
                            "message": "This request could not be executed before the completion window expired.",
                        },
                    }
                )
                for r in self.store.pending(batch_id, batch["total"], set())
            ]
        for column, lines, name in (
            ("output_file_id", self.store.results(batch_id, "completed"), "output"),
            ("error_file_id", failed, "error"),
        ):
            if lines:
                content = ("\n".join(lines) + "\n").encode()
                row = self.store.add_file(
                    owner, f"{batch_id}_{name}.jsonl", "batch_output", content, f"file-{batch_id}-{name}"
                )
                files[column] = row["id"]
        self.store.set_status(batch_id, status, **files)
        log.info("batch %s %s", batch_id, status)
