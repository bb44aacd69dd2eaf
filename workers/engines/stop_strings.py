"""Stop strings, for the engines that make their text token by token (llama_cpp, echo).

A choice's text goes out as it comes, minus what may be the start of a stop string: that
is held back until the next token shows whether the stop string follows. Neither the stop
string nor anything after it is sent (OpenAI's behaviour). The token ids and logprobs
behind held-back text go out with it, so every token is counted once.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenwire.v1 import common_pb2
from workers.engine import Delta


class StopBuffer:
    """Emits text as it comes, minus anything that may start a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for k in range(min(len(buf), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(buf[-k:]) for s in self.stops):
                keep = k
                break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class ChoiceText:
    """One choice's tokens as deltas: text up to the first stop string, with the ids and logprobs behind it."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = StopBuffer(stops)
        self.ids: list[int] = []
        self.logprobs: list[common_pb2.TokenLogprob] = []

    def token(
        self, text: str, token_id: int, logprobs: Sequence[common_pb2.TokenLogprob] = ()
    ) -> tuple[list[Delta], bool]:
        """A token and its text: the delta it completes (none while its text is held back), and
        whether a stop string was reached."""
        self.ids.append(token_id)
        self.logprobs.extend(logprobs)
        emit, stopped = self.stops.push(text)
        if stopped:
            return [self._delta(emit, "stop")], True
        if emit:
            return [self._delta(emit, "")], False
        return [], False

    def end(self, finish: str, tail: str = "") -> list[Delta]:
        """The last delta: what was held back and ``tail``, finished by ``finish`` unless a stop string ends it."""
        emit, stopped = self.stops.push(tail)
        if not stopped:
            emit += self.stops.flush()
        return [self._delta(emit, "stop" if stopped else finish)]

    def _delta(self, text: str, finish: str) -> Delta:
        # Counted by the ids it carries: text held back may come after the token it was part of.
        delta = Delta(text=text, token_ids=self.ids, logprobs=self.logprobs, finish_reason=finish, tokens=len(self.ids))
        self.ids, self.logprobs = [], []
        return delta
