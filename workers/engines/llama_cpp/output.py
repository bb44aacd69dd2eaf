"""One sequence's output: its tokens as deltas, with stop strings, logprobs and forced tool calls."""

from __future__ import annotations

import codecs
import uuid

import numpy as np

from tokenwire.v1 import common_pb2, worker_pb2
from workers.engine import Delta
from workers.engines.llama_cpp.constraints import ToolPlan, parse_tool_call
from workers.engines.llama_cpp.prompt import Vocab
from workers.engines.llama_cpp.scheduler import Handler
from workers.engines.stop_strings import ChoiceText


class Output(Handler):
    """Turns one sequence's tokens into deltas: text, stop strings, logprobs, tool calls.

    Called by the scheduler on the compute thread.
    """

    def __init__(
        self,
        vocab: Vocab,
        request: worker_pb2.GenerateRequest,
        prompt: list[int],
        echo: str | None,
        tools: ToolPlan | None,
    ) -> None:
        self.vocab = vocab
        self.request = request
        self.prompt = prompt
        # Completions with echo: the prompt as text, returned first.
        self.echo = echo
        self.tools = tools
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # A forced call has no stop strings: its text is parsed whole at the end, never sent as content.
        self.text = ChoiceText([] if tools else request.sampling.stop)
        self.generated: list[str] = []  # all text, for tool calls
        self.offset = 0

    def prompt_done(self, rows: list[np.ndarray]) -> list[Delta]:
        if self.echo is None:
            return []
        entries = (
            self._prompt_logprobs(self.prompt, [_log_softmax(r) for r in rows], self.request.top_logprobs)
            if self.request.logprobs
            else []
        )
        self.offset = len(self.echo)
        return [Delta(text=self.echo, logprobs=entries, tokens=0)]

    def token(self, token: int, logits: np.ndarray | None) -> tuple[list[Delta], bool]:
        if self.vocab.is_eog(token):
            return self.end("stop"), True
        text = self.decoder.decode(self.vocab.piece(token, special=False))
        top = self.request.top_logprobs
        entries = [] if logits is None else [self._logprob_entry(token, _log_softmax(logits), top, self.offset)]
        self.offset += len(text)
        if self.tools:
            self.generated.append(text)
            text = ""  # only its tokens go on
        return self.text.token(text, token, entries)

    def end(self, finish: str) -> list[Delta]:
        tail = self.decoder.decode(b"", final=True)
        if not self.tools:
            return self.text.end(finish, tail)
        [last] = self.text.end(finish)
        return [_finish_tool_call(self.tools, "".join(self.generated) + tail, last)]

    def _logprob_entry(self, token: int, logprobs: np.ndarray | None, top: int, offset: int) -> common_pb2.TokenLogprob:
        piece = self.vocab.piece(token, special=True)
        entry = common_pb2.TokenLogprob(token=piece.decode("utf-8", errors="replace"), bytes=piece, text_offset=offset)
        if logprobs is None:  # the first prompt token has no logprob
            return entry
        entry.logprob = float(logprobs[token])
        if top > 0:
            k = min(top, self.vocab.size)
            best = np.argpartition(logprobs, -k)[-k:]
            for alt in best[np.argsort(-logprobs[best])]:
                alt_piece = self.vocab.piece(int(alt), special=True)
                entry.top_logprobs.add(
                    token=alt_piece.decode("utf-8", errors="replace"), logprob=float(logprobs[alt]), bytes=alt_piece
                )
        return entry

    def _prompt_logprobs(self, tokens: list[int], rows: list[np.ndarray], top: int) -> list[common_pb2.TokenLogprob]:
        # Row i holds the distribution of token i + 1.
        entries, offset = [], 0
        for i, token in enumerate(tokens):
            entry = self._logprob_entry(token, rows[i - 1] if i else None, top, offset)
            offset += len(self.vocab.piece(token, special=True).decode("utf-8", errors="replace"))
            entries.append(entry)
        return entries


def _finish_tool_call(tools: ToolPlan, text: str, last: Delta) -> Delta:
    """The last delta of a forced call (``last``: its tokens), with the call, or what was made
    of it when cut short.

    A call cut by max_tokens keeps finish_reason "length" and carries its
    partial arguments, as OpenAI's do; its raw text never goes to content.
    """
    parsed = parse_tool_call(tools.names, text)
    if parsed is None:
        return last
    call = common_pb2.ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        type="function",
        function=common_pb2.FunctionCall(name=parsed.name, arguments=parsed.arguments),
    )
    last.tool_calls = [call]
    if parsed.complete:
        last.finish_reason = "tool_calls"
    return last


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())
