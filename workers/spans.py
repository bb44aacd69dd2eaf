"""A choice's spans on this worker (OpenTelemetry; common/tracing.py sets tracing up).

A ``Generate`` or ``GenerateChoice`` call has its server span from the call wrapper
(``common.tracing.ServedCall``); the choice adds its phases as its children, each beginning
where the one before it ends:

- ``queue``: waiting for a slot (``--limit-worker-concurrency``, ``--max-queue``);
- ``tokenize``: the engine renders the messages with the model's template and tokenizes them;
- ``prefill``: until the engine's first output: the prompt evaluated;
- ``decode``: until the end (the output tokens, the finish reason).

When the call ends its span gets the choice's GenAI attributes. A stream's tokens are counted,
never a span or an event each. Prompt and completion text only with ``--trace-content``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from opentelemetry import trace

from common import tracing
from tokenwire.v1 import worker_pb2
from workers.engine import Delta, message_text

traced = tracing.part("worker")


class ChoiceSpans:
    """One choice's phases; every method does nothing while tracing is off."""

    def __init__(self, model: str) -> None:
        self.on = traced.on
        self.model = model
        self.phase: trace.Span = trace.INVALID_SPAN
        self.output: list[str] | None = [] if self.on and traced.content else None

    def begin(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        """End the phase before, begin ``name``."""
        if self.on:
            self.phase.end()
            self.phase = traced.start_span(name, attributes)

    def captured(self, ready: AsyncGenerator[list[Delta], None]) -> AsyncGenerator[list[Delta], None]:
        """The engine's output, its text kept for the span when content is recorded (else untouched)."""
        if self.output is None:
            return ready
        return self._capture(ready, self.output)

    @staticmethod
    async def _capture(
        ready: AsyncGenerator[list[Delta], None], output: list[str]
    ) -> AsyncGenerator[list[Delta], None]:
        try:
            async for deltas in ready:
                output.extend(delta.text for delta in deltas)
                yield deltas
        finally:
            await ready.aclose()

    def end(
        self,
        request: worker_pb2.GenerateRequest,
        prompt_tokens: int,
        cached_tokens: int | None,
        completion_tokens: int,
        finish: str,
        status: str,
    ) -> None:
        """The last phase's end, and the choice's attributes on its call's span."""
        if not self.on:
            return
        call = trace.get_current_span()
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat" if request.messages else "text_completion",
            "gen_ai.request.model": self.model,
            "tokenwire.choice.index": request.index,
            "gen_ai.usage.input_tokens": prompt_tokens,
            "gen_ai.usage.output_tokens": completion_tokens,
        }
        if cached_tokens is not None:  # known once the prompt is evaluated; said with the last delta
            attributes["gen_ai.usage.cache_read.input_tokens"] = cached_tokens
        if finish:
            attributes["gen_ai.response.finish_reasons"] = [finish]
            self.phase.set_attribute("gen_ai.response.finish_reasons", [finish])
        self.phase.set_attribute("gen_ai.usage.output_tokens", completion_tokens)
        if status != "ok":  # on the phase it happened in (the call's span has the call's status)
            self.phase.set_attribute("error.type", status)
            self.phase.set_status(trace.StatusCode.ERROR, status)
        if self.output is not None:
            attributes["gen_ai.input.messages"] = _input_messages(request)
            attributes["gen_ai.output.messages"] = json.dumps(
                [
                    {
                        "role": "assistant",
                        "parts": [{"type": "text", "content": "".join(self.output)}],
                        "finish_reason": finish,
                    }
                ]
            )
        self.phase.end()
        if call.is_recording():
            call.set_attributes(attributes)


def _input_messages(request: worker_pb2.GenerateRequest) -> str:
    """The prompt as GenAI's ``gen_ai.input.messages`` (JSON): the messages, or a completion's prompt."""
    if request.messages:
        messages = [{"role": m.role, "parts": [{"type": "text", "content": message_text(m)}]} for m in request.messages]
    elif request.prompt.HasField("tokens"):
        messages = [{"role": "user", "parts": [{"type": "tokens", "content": list(request.prompt.tokens.ids)}]}]
    else:
        messages = [{"role": "user", "parts": [{"type": "text", "content": request.prompt.text}]}]
    return json.dumps(messages)
