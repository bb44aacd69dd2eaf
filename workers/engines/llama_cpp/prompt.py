"""Prompts: chat messages rendered by the GGUF's own chat template, and text to tokens and back."""

from __future__ import annotations

import ctypes
import json
from collections.abc import Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict

from common import errors
from tokenwire.v1 import common_pb2, worker_pb2

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class Vocab:
    """The model's vocabulary: text to token ids, and token ids to the bytes they stand for."""

    def __init__(self, model: Any) -> None:
        self.model = model  # _internals.LlamaModel
        self.handle = model.vocab  # the llama_vocab pointer
        self.size: int = model.n_vocab()

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        # special=True: the template's <|im_start|> etc. must be single special tokens.
        return list(self.model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def piece(self, token: int, special: bool) -> bytes:
        from llama_cpp import llama_cpp as C

        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self.handle, token, buf, len(buf), 0, special)
        if n < 0:  # a longer piece: -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.handle, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], special: bool) -> bytes:
        return b"".join(self.piece(t, special) for t in tokens)

    def is_eog(self, token: int) -> bool:
        from llama_cpp import llama_cpp as C

        return bool(C.llama_vocab_is_eog(self.handle, token))

    def max_token_bytes(self) -> int:
        """The most input bytes one token can cover (ModelInfo.max_token_bytes), 0 = no bound.

        BPE (byte-level) and SPM tokenizers cover the input exactly with the pieces
        of their tokens, and prompts are tokenized with special=True, so the longest
        piece, special tokens' text included, is the bound; at least 4 (one UTF-8
        character), for an unknown character that becomes one <unk>. WPM and UGM
        normalise the input (whitespace, unknown words become one token), and a
        token that strips the whitespace beside it covers any amount of it: no bound.
        Costs ~0.1 s at load for a 49k vocabulary.
        """
        from llama_cpp import llama_cpp as C

        if C.llama_vocab_type(self.handle) not in (C.LLAMA_VOCAB_TYPE_BPE, C.LLAMA_VOCAB_TYPE_SPM):
            return 0
        strips = C.LLAMA_TOKEN_ATTR_LSTRIP | C.LLAMA_TOKEN_ATTR_RSTRIP
        buf = ctypes.create_string_buffer(256)
        longest = 4
        for token in range(self.size):
            if C.llama_vocab_get_attr(self.handle, token) & strips:
                return 0
            n = C.llama_token_to_piece(self.handle, token, buf, len(buf), 0, True)
            longest = max(longest, -n if n < 0 else n)  # negative: the piece needs -n bytes
        return longest


class Prompts:
    """A request's prompt as token ids: chat messages by the GGUF's chat template, text and ids as given."""

    def __init__(self, vocab: Vocab, template: str) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        model = vocab.model
        self.vocab = vocab
        # Any: its TypedDict message types say less than the plain dicts we give it.
        self.formatter: Any = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(model.token_eos()),
            bos_token=model.token_get_text(model.token_bos()),
            add_generation_prompt=True,
        )
        # A template that renders `tools` tells the model about them itself.
        self.shows_tools = "tools" in template

    def max_token_bytes(self) -> int:
        """ModelInfo.max_token_bytes: the bound counts the messages' content, so it holds only
        if the template renders that content whole."""
        return self.vocab.max_token_bytes() if self.keeps_content() else 0

    def keeps_content(self) -> bool:
        """Whether the chat template renders every message's content verbatim (untrimmed)."""
        probes = [("system", " probe-1 \n"), ("user", " probe-2 \n"), ("assistant", " probe-3 \n"), ("user", " p4 ")]
        tool = [("tool", " probe-5 \n"), ("user", " p6 ")]
        for conversation in (probes, probes + tool):
            try:
                dicts: list[Any] = [{"role": r, "content": text, "tool_call_id": "call_1"} for r, text in conversation]
                prompt = self.formatter(messages=dicts).prompt
            except Exception:  # e.g. a template without tool messages: those requests are refused anyway
                if conversation is probes:
                    return False
                continue
            if not all(text in prompt for _, text in conversation):
                return False
        return True

    def render(
        self, messages: Sequence[common_pb2.ChatMessage], tools: Sequence[common_pb2.Tool] = (), instructions: str = ""
    ) -> str:
        """The prompt text of chat messages, by the GGUF's own chat template.

        ``instructions`` go first in the system message (one is added if
        there is none), for what the template itself cannot say.
        """
        dicts: list[dict[str, Any]] = []
        for i, message in enumerate(messages):
            role = _ROLES.get(message.role)
            if role is None:
                raise errors.invalid_request(
                    f"Unknown role `{message.role}`; use system, developer, user, assistant or tool.",
                    param=f"messages[{i}].role",
                )
            content = _message_text(message, i)
            if message.tool_calls and not content:
                # Templates without tool support still need the call in the history.
                content = json.dumps(
                    [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls],
                    ensure_ascii=False,
                )
            entry: dict[str, Any] = {"role": role, "content": content}
            if message.name:
                entry["name"] = message.name
            if message.tool_call_id:
                entry["tool_call_id"] = message.tool_call_id
            dicts.append(entry)
        if instructions:
            if dicts and dicts[0]["role"] == "system":
                dicts[0]["content"] = instructions + "\n\n" + dicts[0]["content"]
            else:
                dicts.insert(0, {"role": "system", "content": instructions})
        try:
            return self.formatter(
                messages=dicts, tools=[MessageToDict(t, preserving_proto_field_name=True) for t in tools] or None
            ).prompt
        except Exception as exc:  # the template's raise_exception, or a template error on odd input
            raise errors.invalid_request(f"The messages cannot be rendered: {exc}", param="messages") from exc

    def tokens(self, request: worker_pb2.GenerateRequest, instructions: str = "") -> tuple[list[int], str | None]:
        """The request's prompt as token ids, and as text for a completion (what echo returns)."""
        if request.messages:
            # A rendered chat already holds whatever BOS the template wants.
            text = self.render(request.messages, request.tools, instructions)
            return self.vocab.tokenize(text, add_bos=False), None
        if request.prompt.HasField("tokens"):
            ids = list(request.prompt.tokens.ids)
            bad = [t for t in ids if not 0 <= t < self.vocab.size]
            if bad:
                raise errors.invalid_request(
                    f"Token id {bad[0]} is out of range: this model's vocabulary has {self.vocab.size} tokens "
                    f"(ids 0..{self.vocab.size - 1}).",
                    param="prompt",
                )
            text = self.vocab.detokenize(ids, special=True).decode("utf-8", errors="replace")
        else:
            text = request.prompt.text
            ids = self.vocab.tokenize(text, add_bos=True)
        if not ids:
            # An empty prompt: start from BOS, as OpenAI starts from <|endoftext|>.
            ids = [self.vocab.model.token_bos()]
        return ids, text

    def tokenize(
        self, prompt: str | None, messages: Sequence[common_pb2.ChatMessage], add_special_tokens: bool | None
    ) -> list[int]:
        """Engine.tokenize: BOS as generation adds it, unless the caller says otherwise."""
        chat = bool(messages)
        text = self.render(messages) if chat else prompt or ""
        add_bos = not chat if add_special_tokens is None else add_special_tokens
        return self.vocab.tokenize(text, add_bos)


def _message_text(message: common_pb2.ChatMessage, index: int) -> str:
    if message.HasField("content_parts"):
        texts = []
        for part in message.content_parts.parts:
            if part.type != "text":
                raise errors.invalid_request(
                    f"Content parts of type `{part.type}` are not supported by this model; only `text` parts are.",
                    param=f"messages[{index}].content",
                )
            texts.append(part.text)
        return "".join(texts)
    return message.content
