"""The llama_cpp engine: a GGUF chat model run by llama-cpp-python, its parts wired together.

Every admitted generation runs in one llama context, batched with the others
(continuous batching, :mod:`workers.engines.llama_cpp.scheduler`): one ``llama_decode``
per step carries a token of every decoding sequence and prompt chunks of the
sequences being admitted. Each sequence has its own sampler (temperature,
top_p/top_k/min_p, penalties, logit_bias, seed, grammar), stop strings,
logprobs and max_tokens; the engine turns a request into that sequence
(:mod:`~workers.engines.llama_cpp.prompt`, :mod:`~workers.engines.llama_cpp.constraints`)
and its tokens into deltas (:mod:`~workers.engines.llama_cpp.output`). All calls into
llama.cpp happen on the engine's one compute thread (see :func:`workers.engine.compute_thread`).

Logits are computed only where needed: the last prompt token of each sequence and every
decoding token; echo with logprobs asks for every prompt row of that one sequence.
(``logits_all=True`` cost 10-20% of speed and 1.6 GB at 8192.) Prompts are evaluated in
chunks ending on multiples of 32 positions (as fast as 512-token batches here), and a cached
prefix is reused whole with the last position's logits, or in whole chunks: splitting a
prompt differently changes no logit, but positions decoded token by token and, in the
unified cache, cells placed elsewhere do (``bench/experiments/kv_numerics.py``), so reusing an arbitrary
cached prefix would make "same seed, same request, alone, same text" depend on what ran before.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from common import errors
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
from workers.engines.llama_cpp import sampling
from workers.engines.llama_cpp.constraints import Constraints, ToolPlan
from workers.engines.llama_cpp.loading import (
    DEFAULT_FLASH_ATTN,
    DEFAULT_PARALLEL,
    DEFAULT_PREFILL_BUDGET,
    DEFAULT_PROMPT_CACHE_MIB,
    FLASH_ATTN,
    KV_CACHES,
    default_threads,
    load,
)
from workers.engines.llama_cpp.output import Output
from workers.engines.llama_cpp.prompt import Prompts, Vocab
from workers.engines.llama_cpp.scheduler import BATCH_YIELDS, DEFAULT_BATCH_YIELD, Scheduler, Seq, stream
from workers.model_names import model_name_for


@dataclass
class _Plan:
    tokens: list[int]
    # Completions: the prompt as text, returned first when echo is asked for.
    echo_text: str | None = None
    grammar: Any = None  # LlamaGrammar
    tools: ToolPlan | None = None


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
        batch_yield: str = DEFAULT_BATCH_YIELD,
    ) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        if flash_attn not in FLASH_ATTN:
            raise ValueError(f"flash_attn must be one of {', '.join(FLASH_ATTN)}")
        if kv_cache not in ("auto", *KV_CACHES):
            raise ValueError(f"kv_cache must be auto or one of {', '.join(KV_CACHES)}")
        if batch_yield not in BATCH_YIELDS:
            raise ValueError(f"batch_yield must be one of {', '.join(BATCH_YIELDS)}")
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
        # The worker's slots let interactive calls past batch ones when the scheduler preempts those.
        self.preempts_batch = batch_yield == "preempt"
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

    # -- lifecycle --

    async def start(self) -> None:
        if self._model is None:
            await run_blocking(self._load, pool=self._compute)

    def _load(self) -> None:
        loaded = load(self)
        self._model, self._ctx, self.kv_cache = loaded.model, loaded.ctx, loaded.kv_cache
        self._vocab = Vocab(loaded.model)
        self._prompts = Prompts(self._vocab, loaded.chat_template)
        self._constraints = Constraints(self._vocab.handle, shows_tools=self._prompts.shows_tools)
        self._scheduler = Scheduler(
            loaded.ctx.ctx,
            self._vocab.size,
            loaded.kv,
            parallel=self.parallel,
            prefill_budget=self.prefill_budget,
            pool=self._compute,
            stats=self._stats,
            preempt_batch=self.preempts_batch,
        )
        self.info.context_length = self._scheduler.n_ctx
        self.info.max_token_bytes = self._prompts.max_token_bytes()

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

    # -- Engine API --

    def render(
        self, messages: Sequence[common_pb2.ChatMessage], tools: Sequence[common_pb2.Tool] = (), instructions: str = ""
    ) -> str:
        """The prompt text of chat messages, by the GGUF's own chat template."""
        return self._prompts.render(messages, tools, instructions)

    def _prepare(self, request: worker_pb2.GenerateRequest) -> Prepared:
        check_token_ids(request.sampling.logit_bias, self._vocab.size, "logit_bias")
        grammar, tools, instructions = self._constraints.of(request)
        tokens, text = self._prompts.tokens(request, instructions)
        plan = _Plan(tokens=tokens, echo_text=text, grammar=grammar, tools=tools)
        return Prepared(prompt_tokens=len(tokens), param="messages" if request.messages else "prompt", state=plan)

    async def prepare(self, request: worker_pb2.GenerateRequest) -> Prepared:
        return await run_blocking(self._prepare, request)

    async def tokenize(
        self, prompt: str | None, messages: Sequence[common_pb2.ChatMessage], add_special_tokens: bool | None = None
    ) -> list[int]:
        return await run_blocking(self._prompts.tokenize, prompt, messages, add_special_tokens)

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        check_token_ids(token_ids, self._vocab.size)
        text = await run_blocking(self._vocab.detokenize, token_ids, True)
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
            handler=Output(self._vocab, request, plan.tokens, plan.echo_text if echo else None, plan.tools),
            make_sampler=lambda: sampling.make_sampler(
                request.sampling, plan.grammar, self._model, self._vocab.size, self.info.context_length
            ),
            prompt_rows=echo and request.logprobs,
            logits=request.logprobs,
            buffered=generation.whole,
            batch=request.priority == worker_pb2.PRIORITY_BATCH,
        )
        # The scheduler's own lists, straight to the worker (which closes them when it stops).
        return stream(self._scheduler, seq)

    def batch_stats(self) -> BatchStats | None:
        return self._stats
