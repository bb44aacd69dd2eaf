"""A chat stream as the Responses API's ``response.*`` server-sent events, each numbered."""

from __future__ import annotations

from typing import Any

import orjson

from common.errors import ApiError
from rest_bridge.responses.output import Turn
from tokenwire.v1 import api_pb2


class EventStream:
    """Chat chunks in, ``response.*`` server-sent events out, each numbered.

    ``start``, ``chunk``, ``finish`` and ``fail`` give the bytes of their events, in the
    order the stream sends them (rest_bridge/exchange.py's ``SseEvents``).
    """

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.sequence = 0
        self.message_index: int | None = None  # output index of the open message item
        self.items = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def start(self) -> bytes:
        snapshot = self.turn.response("in_progress")
        return self.event("response.created", response=snapshot) + self.event("response.in_progress", response=snapshot)

    def _text_ids(self) -> dict[str, Any]:
        return {"item_id": self.turn.message_id, "output_index": self.message_index, "content_index": 0}

    def _open_message(self) -> list[bytes]:
        self.message_index, self.items = self.items, self.items + 1
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self.event(
                "response.output_item.added",
                output_index=self.message_index,
                item=self.turn.message_item("in_progress"),
            ),
            self.event("response.content_part.added", part=part, **self._text_ids()),
        ]

    def _close_message(self) -> list[bytes]:
        if self.message_index is None:
            return []
        text = "".join(self.turn.text)
        status = "incomplete" if self.turn.incomplete else "completed"
        item = self.turn.message_item(status, text)
        out = [
            self.event("response.output_text.done", text=text, logprobs=[], **self._text_ids()),
            self.event("response.content_part.done", part=item["content"][0], **self._text_ids()),
            self.event("response.output_item.done", output_index=self.message_index, item=item),
        ]
        self.message_index = None
        return out

    def chunk(self, chunk: api_pb2.StreamChatCompletionResponse) -> bytes:
        out: list[bytes] = []
        if chunk.HasField("usage"):
            self.turn.set_usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        for choice in chunk.choices:
            delta = choice.delta
            if delta.HasField("content") and delta.content:
                if self.message_index is None:
                    out += self._open_message()
                self.turn.text.append(delta.content)
                out.append(
                    self.event("response.output_text.delta", delta=delta.content, logprobs=[], **self._text_ids())
                )
            for call in delta.tool_calls:
                out += self._close_message()
                item = self.turn.add_call(call.id, call.function.name, call.function.arguments)
                index, self.items = self.items, self.items + 1
                ids = {"item_id": item["id"], "output_index": index}
                out += [
                    self.event(
                        "response.output_item.added",
                        output_index=index,
                        item={**item, "arguments": "", "status": "in_progress"},
                    ),
                    self.event("response.function_call_arguments.delta", delta=item["arguments"], **ids),
                    self.event(
                        "response.function_call_arguments.done", arguments=item["arguments"], name=item["name"], **ids
                    ),
                    self.event("response.output_item.done", output_index=index, item=item),
                ]
            if choice.HasField("finish_reason"):
                self.turn.finish = choice.finish_reason
        return b"".join(out)

    def finish(self) -> bytes:
        out = []
        if self.message_index is None and not self.turn.calls:
            out += self._open_message()  # an empty answer is still one message, as in the unary output
        out += self._close_message()
        response = self.turn.response()
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return b"".join([*out, self.event(kind, response=response)])

    def fail(self, error: ApiError) -> bytes:
        code = error.code or error.type
        failed = self.turn.response("failed", {"code": code, "message": error.message})
        return self.event("error", code=code, message=error.message, param=error.param) + self.event(
            "response.failed", response=failed
        )
