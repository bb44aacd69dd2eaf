"""The engines without tokenwire: llama-cpp-python and transformers in-process.

Run by ``bench/run.py`` on the project's Python (it has llama-cpp-python and torch);
prints one JSON object on stdout.

    .venv/bin/python -m bench.engine_raw llama --model-path X.gguf --threads 2 --n-ctx 2048 --max-tokens 128 --runs 3
    .venv/bin/python -m bench.engine_raw llama --model-path X.gguf --threads 2 --serve   # one run per stdin line
    .venv/bin/python -m bench.engine_raw embed --model-path DIR --threads 2 --inputs 8 --clients 1 --duration 8

``llama`` measures, from the same GGUF with the same threads, context and sampling
(greedy; every end-of-generation token banned where the ban is native, so that every
run makes exactly ``--max-tokens`` tokens):

- ``high_level``: ``Llama.create_chat_completion(stream=True)``, what a user of
  llama-cpp-python writes. Without ``logit_bias``: llama-cpp-python applies it as a
  Python logits processor over the whole vocabulary (19 instead of 105 tok/s here),
  and greedy decoding of this prompt reaches ``--max-tokens`` without an
  end-of-generation token anyway (``tokens`` in the output shows it);
- ``low_level``: the prompt rendered with the GGUF's chat template, ``Llama.eval`` and
  a native ``LlamaSampler`` (logit bias + greedy), token by token: the floor any
  server on llama-cpp-python can reach, and what tokenwire's engine does inside.

Run k asks ``prompt(k)`` (warm-up 0, then 1..runs), the same prompts tokenwire gets, and
the KV cache is reset before every run, so each one evaluates its whole prompt.

With ``--serve`` the model stays loaded: the first stdout line describes it, then each
stdin line ``{"path": "low_level", "k": 3}`` is answered by one line with that run's
timing. The suite uses it to interleave in-process runs with runs through tokenwire,
so that both sides see the same machine, run after run.

``embed`` encodes ``--inputs`` sentences per call (tokenizer, forward, masked mean
pooling, L2 normalisation, ``tolist``) from ``--clients`` threads for
``--duration`` seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request
from typing import Any

import orjson

PROMPT = "Write a long story about a robot who learns to paint."


def prompt(k: int) -> str:
    """Run k's prompt: a different first line each run, so no run reuses another's KV cache."""
    return f"Request {k}. {PROMPT}"


SENTENCE = "The quick brown fox number {i} jumps over the lazy dog near the river bank."


def eog_tokens(llm: Any) -> list[int]:
    from llama_cpp import llama_cpp as C

    vocab = llm._model.vocab
    return [t for t in range(llm.n_vocab()) if C.llama_vocab_is_eog(vocab, t)]


def llama(args: argparse.Namespace) -> dict[str, Any]:
    from llama_cpp import Llama, _internals
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    t0 = time.perf_counter()
    llm = Llama(
        model_path=args.model_path,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    banned = eog_tokens(llm)
    bias = dict.fromkeys(banned, -100.0)

    def high_level(k: int) -> dict[str, float]:
        messages = [{"role": "user", "content": prompt(k)}]
        llm.reset()
        clock = StreamClock()
        for chunk in llm.create_chat_completion(
            messages=messages, temperature=0.0, max_tokens=args.max_tokens, stream=True
        ):
            if chunk["choices"][0]["delta"].get("content"):
                clock.content()
        # The stream has no usage: one content chunk per token.
        return clock.record(clock.pieces)

    template = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(
        template=template,
        eos_token=llm._model.token_get_text(llm.token_eos()),
        bos_token=llm._model.token_get_text(llm.token_bos()),
        add_generation_prompt=True,
    )

    def tokens_of(k: int) -> list[int]:
        rendered = formatter(messages=[{"role": "user", "content": prompt(k)}]).prompt
        return llm.tokenize(rendered.encode(), add_bos=False, special=True)

    def low_level(k: int) -> dict[str, float]:
        prompt_tokens = tokens_of(k)
        llm.reset()
        sampler = _internals.LlamaSampler()
        sampler.add_logit_bias(llm.n_vocab(), bias)
        sampler.add_greedy()
        clock = StreamClock()
        llm.eval(prompt_tokens)
        text = b""
        token = -1
        for step in range(args.max_tokens):
            if step:
                llm.eval([token])
            token = sampler.sample(llm._ctx, -1)
            text += llm.detokenize([token])
            clock.content()
        return clock.record(args.max_tokens)

    out: dict[str, Any] = {
        "load_s": load_s,
        "eog_tokens": banned,
        "prompt_tokens": len(tokens_of(1)),
        "threads": args.threads,
        "n_ctx": args.n_ctx,
    }
    paths = {"high_level": high_level, "low_level": low_level}
    for fn in paths.values():
        fn(0)  # warm-up
    if args.serve:
        print(json.dumps(out), flush=True)
        for line in sys.stdin:
            ask = json.loads(line)
            print(json.dumps(paths[ask["path"]](int(ask["k"]))), flush=True)
        return out
    for name, fn in paths.items():
        out[name] = [fn(k) for k in range(1, args.runs + 1)]
    return out


class StreamClock:
    """The timestamps of one stream, and its TTFT, decode and end-to-end speed.

    Made when the request is sent; :meth:`content` for every piece of content
    that arrives; :meth:`record` when the stream has ended.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.pieces = 0

    def content(self) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        self.pieces += 1

    def record(self, tokens: int) -> dict[str, float]:
        end = time.perf_counter()
        first, last = self.first or end, self.last or end
        return {
            "ttft_s": first - self.start,
            "total_s": end - self.start,
            "tokens": tokens,
            "pieces": self.pieces,
            "decode_tok_s": (tokens - 1) / (last - first) if last > first else 0.0,
            "e2e_tok_s": tokens / (end - self.start),
        }


def stream_timing(base: str, body: dict[str, Any], timeout: float = 300) -> dict[str, float]:
    """One streamed chat through a REST bridge (or any OpenAI server), timed by a StreamClock."""
    request = urllib.request.Request(
        base + "/v1/chat/completions", data=orjson.dumps(body), headers={"Content-Type": "application/json"}
    )
    clock = StreamClock()
    tokens = 0
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        for line in reply:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = orjson.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"in-band error: {event}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
                clock.content()
    return clock.record(tokens)


def embed(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path, local_files_only=True)
    model = AutoModel.from_pretrained(args.model_path, local_files_only=True).eval()
    load_s = time.perf_counter() - t0
    batch = [SENTENCE.format(i=i) for i in range(args.inputs)]

    def encode() -> list[list[float]]:
        encoded = tokenizer(batch, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**encoded).last_hidden_state
            weights = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1).tolist()

    encode()  # warm-up
    out: dict[str, Any] = {"load_s": load_s, "threads": args.threads, "inputs": args.inputs}
    for clients in args.clients:
        counts = [0] * clients
        latencies: list[float] = []
        deadline = time.perf_counter() + args.duration

        def loop(
            k: int, deadline: float = deadline, counts: list[int] = counts, latencies: list[float] = latencies
        ) -> None:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                encode()
                latencies.append(time.perf_counter() - t)
                counts[k] += 1

        start = time.perf_counter()
        threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        calls = sum(counts)
        latencies.sort()
        out[f"clients_{clients}"] = {
            "calls": calls,
            "elapsed_s": elapsed,
            "embeddings_per_s": calls * args.inputs / elapsed,
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("llama")
    p.add_argument("--model-path", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--serve", action="store_true", help="keep the model loaded; one run per stdin line")
    e = sub.add_parser("embed")
    e.add_argument("--model-path", required=True)
    e.add_argument("--threads", type=int, required=True)
    e.add_argument("--inputs", type=int, default=8)
    e.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    e.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args()
    if args.what == "llama" and args.serve:
        llama(args)
        return
    result = llama(args) if args.what == "llama" else embed(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
