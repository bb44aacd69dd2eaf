"""The Responses objects built from a chat answer: ids, the answer as it accumulates, the response object."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import shortuuid

from tokenwire.v1 import api_pb2


def new_id(prefix: str) -> str:
    return f"{prefix}_{shortuuid.uuid()}"


@dataclass
class Turn:
    """The assistant's answer as it accumulates: text, tool calls, finish, usage."""

    response_id: str
    created_at: int
    echo: dict[str, Any]
    message_id: str = field(default_factory=lambda: new_id("msg"))
    text: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    finish: str = ""
    usage: dict[str, Any] | None = None

    @property
    def incomplete(self) -> bool:
        return self.finish == "length"

    def message_item(self, status: str, text: str | None = None) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def add_call(self, call_id: str, name: str, arguments: str) -> dict[str, Any]:
        item = {
            "id": new_id("fc"),
            "type": "function_call",
            "status": "completed",
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
        }
        self.calls.append(item)
        return item

    def output(self) -> list[dict[str, Any]]:
        text = "".join(self.text)
        items = []
        if text or not self.calls:
            items.append(self.message_item("incomplete" if self.incomplete else "completed", text))
        return [*items, *self.calls]

    def set_usage(self, prompt: int, completion: int) -> None:
        self.usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }

    def response(self, status: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response object: in progress (``status``), failed, or final."""
        if status is None:
            status = "incomplete" if self.incomplete else "completed"
        final = status in ("completed", "incomplete")
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "output": self.output() if final else [],
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "truncation": "disabled",
            "usage": self.usage if final else None,
            **self.echo,
        }

    def history_message(self) -> dict[str, Any]:
        """This answer as the chat message a follow-up request replays."""
        text = "".join(self.text)
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not self.calls else None}
        if self.calls:
            message["tool_calls"] = [
                {"id": c["call_id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in self.calls
            ]
        return message


def from_completion(turn: Turn, reply: api_pb2.CreateChatCompletionResponse) -> Turn:
    choice = reply.choices[0]
    if choice.message.HasField("content"):
        turn.text.append(choice.message.content)
    for call in choice.message.tool_calls:
        turn.add_call(call.id, call.function.name, call.function.arguments)
    turn.finish = choice.finish_reason
    turn.set_usage(reply.usage.prompt_tokens, reply.usage.completion_tokens)
    return turn
