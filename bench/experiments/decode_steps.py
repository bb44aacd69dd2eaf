"""Raw ``llama_decode`` steps, no scheduler: the ceiling each KV layout and attention kernel gives.

The embedded SmolLM2 GGUF through llama-cpp-python's low-level API: S sequences each get the
bench's chat prompt, then ``--steps`` steps decode one token of every sequence in one batch,
each sequence sampled by its own chain. Prints the best of 3 runs (after a warm-up).

    .venv/bin/python -m bench.experiments.decode_steps --sequences 8 [--per-sequence-kv] [--flash-attn off|on|auto]
        [--sampler whole|top-k] [--id-stride 2] [--streams 8 --n-ctx 65536]

``whole`` samples temperature 0.7 over the whole vocabulary (an OpenAI request with only a
temperature: what tokenwire does); ``top-k`` cuts to top_k 40 / top_p 0.95 / min_p 0.05 first, as
llama-server does by default. ``--id-stride K`` gives sequence s the id s*K: with per-sequence KV,
llama.cpp puts only consecutive ids into one micro-batch, so gaps between running ids cost steps.
``--streams 8 --n-ctx 65536`` gives the context 8 streams of 8192 cells whatever ``--sequences`` runs,
as the worker has (``huge_pages.py`` runs it with and without huge pages).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.experiments.kv_numerics import CHAT  # the same chat prompt
from workers.engines.llama_cpp.loading import FLASH_ATTN, default_model_path

EOG_BAN = (0, 2, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--n-ctx", type=int, default=8192, help="the whole KV cache (split per stream)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-sequence-kv", action="store_true")
    parser.add_argument("--flash-attn", choices=sorted(FLASH_ATTN), default="off")
    parser.add_argument("--sampler", choices=["whole", "top-k"], default="whole")
    parser.add_argument("--id-stride", type=int, default=1, help="sequence s gets id s * K")
    parser.add_argument(
        "--streams", type=int, default=0, help="sequence ids (KV streams) the context has (default: as many as used)"
    )
    args = parser.parse_args()
    from llama_cpp import llama_cpp as C

    C.llama_backend_init()
    model_params = C.llama_model_default_params()
    model_params.use_extra_bufts = False
    model = C.llama_model_load_from_file(default_model_path().encode(), model_params)
    vocab = C.llama_model_get_vocab(model)
    n_vocab = C.llama_vocab_n_tokens(vocab)
    params = C.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = args.n_ctx, 512, 32
    params.n_seq_max = max(args.streams, args.sequences * args.id_stride)
    ids_of = [s * args.id_stride for s in range(args.sequences)]
    params.kv_unified = not args.per_sequence_kv
    params.n_threads = params.n_threads_batch = args.threads
    params.flash_attn_type = FLASH_ATTN[args.flash_attn]
    params.no_perf = True
    ctx = C.llama_init_from_model(model, params)
    memory = C.llama_get_memory(ctx)
    batch = C.llama_batch_init(512, 0, 1)
    text = CHAT.encode()
    ids = (C.llama_token * 512)()
    prompt = list(ids[: C.llama_tokenize(vocab, text, len(text), ids, 512, False, True)])

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        if C.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def chain(seed: int) -> Any:
        sampler = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        if args.sampler == "whole":
            bias = (C.llama_logit_bias * len(EOG_BAN))(*[C.llama_logit_bias(t, -100.0) for t in EOG_BAN])
            C.llama_sampler_chain_add(sampler, C.llama_sampler_init_logit_bias(n_vocab, len(EOG_BAN), bias))
        else:
            C.llama_sampler_chain_add(sampler, C.llama_sampler_init_top_k(40))
            C.llama_sampler_chain_add(sampler, C.llama_sampler_init_top_p(0.95, 1))
            C.llama_sampler_chain_add(sampler, C.llama_sampler_init_min_p(0.05, 1))
        C.llama_sampler_chain_add(sampler, C.llama_sampler_init_temp(0.7))
        C.llama_sampler_chain_add(sampler, C.llama_sampler_init_dist(seed))
        return sampler

    def run() -> tuple[float, float]:
        C.llama_memory_clear(memory, True)
        samplers = [chain(s) for s in range(args.sequences)]
        last = []
        for s in range(args.sequences):
            decode([(t, p, ids_of[s], p == len(prompt) - 1) for p, t in enumerate(prompt)])
            last.append(C.llama_sampler_sample(samplers[s], ctx, len(prompt) - 1))
        start = time.perf_counter()
        for step in range(args.steps):
            decode([(last[s], len(prompt) + step, ids_of[s], True) for s in range(args.sequences)])
            last = [C.llama_sampler_sample(samplers[s], ctx, s) for s in range(args.sequences)]
        elapsed = time.perf_counter() - start
        for sampler in samplers:
            C.llama_sampler_free(sampler)
        return 1000 * elapsed / args.steps, args.sequences * args.steps / elapsed

    run()
    step_ms, tok_s = min((run() for _ in range(3)), key=lambda r: r[0])
    layout = "per-sequence KV" if args.per_sequence_kv else "unified KV"
    layout += f", ids every {args.id_stride}" if args.id_stride > 1 else ""
    layout += f", {params.n_seq_max} streams of {args.n_ctx // params.n_seq_max} cells" if args.per_sequence_kv else ""
    print(
        f"{args.sequences} sequences, {layout}, flash attention {args.flash_attn}, {args.sampler} sampler: "
        f"{step_ms:.2f} ms a step, {tok_s:.0f} tokens/s"
    )


if __name__ == "__main__":
    main()
