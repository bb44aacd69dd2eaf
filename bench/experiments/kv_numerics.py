"""Which changes in how llama.cpp evaluates a prompt change its logits (README, "Numerics").

The embedded SmolLM2 GGUF, greedy, llama-cpp-python's low-level API, one context. A chat
prompt is evaluated the reference way (one batch, 32-token micro-batches, from an empty
KV cache) and then again with one thing changed; the figure is the largest logit difference
over the prompt's last token and 8 greedy decoding steps (0: bit for bit the same).

    .venv/bin/python -m bench.experiments.kv_numerics [--flash-attn off|on] [--per-sequence-kv] [--long]

``--long`` repeats the prompt to 300 tokens; ``--per-sequence-kv`` gives each sequence its
own KV stream (``kv_unified=false``) instead of one shared pool.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from workers.engines.llama_cpp.loading import default_model_path

CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWrite a story about a dragon who lives in a castle.<|im_end|>\n<|im_start|>assistant\n"
)
DECODE_STEPS = 8


class Probe:
    def __init__(self, flash_attn: int, unified: bool, long: bool) -> None:
        from llama_cpp import llama_cpp as C

        self.C = C
        C.llama_backend_init()
        model_params = C.llama_model_default_params()
        model_params.use_extra_bufts = False  # as the engine loads it
        self.model = C.llama_model_load_from_file(default_model_path().encode(), model_params)
        vocab = C.llama_model_get_vocab(self.model)
        self.n_vocab = C.llama_vocab_n_tokens(vocab)
        params = C.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 4096, 1024, 32, 2
        params.kv_unified = unified
        params.n_threads = params.n_threads_batch = 2
        params.flash_attn_type = flash_attn
        self.ctx = C.llama_init_from_model(self.model, params)
        self.memory = C.llama_get_memory(self.ctx)
        self.batch = C.llama_batch_init(1024, 0, 1)
        text = CHAT.encode()
        ids = (C.llama_token * 512)()
        n = C.llama_tokenize(vocab, text, len(text), ids, 512, False, True)
        self.prompt = list(ids[:n])
        if long:
            self.prompt = (self.prompt * 8)[:300]

    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        if self.C.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def logits(self, row: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.C.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,)).copy()

    def fresh(self) -> None:
        self.C.llama_memory_clear(self.memory, True)

    def run(self, groups: list[int], neighbour: list[int] | None = None) -> list[np.ndarray]:
        """Evaluate the prompt in ``groups`` (one llama_decode each) as sequence 0, then decode greedily.

        With ``neighbour``, sequence 1's prompt rides in the same batches and decodes beside it.
        """
        prompt, n = self.prompt, len(self.prompt)
        pos = 0
        for size in groups:
            items = [(prompt[q], q, 0, q == n - 1) for q in range(pos, pos + size)]
            if neighbour is not None and pos == 0:
                items += [(t, q, 1, False) for q, t in enumerate(neighbour)]
            self.decode(items)
            pos += size
        rows = [self.logits(groups[-1] - 1)]  # the last prompt token is the last group's last row
        token, other, other_pos = int(np.argmax(rows[0])), (neighbour or [0])[-1], len(neighbour or [])
        for _ in range(DECODE_STEPS):
            items = [(token, pos, 0, True)]
            if neighbour is not None:
                items = [(other, other_pos, 1, True), *items]
                other_pos += 1
            self.decode(items)
            pos += 1
            rows.append(self.logits(len(items) - 1))
            token = int(np.argmax(rows[-1]))
        return rows


def difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flash-attn", choices=["off", "on"], default="off")
    parser.add_argument("--per-sequence-kv", action="store_true")
    parser.add_argument("--long", action="store_true")
    args = parser.parse_args()
    probe = Probe({"off": 0, "on": 1}[args.flash_attn], not args.per_sequence_kv, args.long)
    n = len(probe.prompt)
    probe.fresh()
    reference = probe.run([n])
    cases: list[tuple[str, Any]] = [
        ("split into 8 + rest", lambda: probe.run([8, n - 8])),
        ("split into 31 + rest", lambda: probe.run([31, n - 31])),
        ("split into rest + 1", lambda: probe.run([n - 1, 1])),
        ("token by token, as decoding does", lambda: probe.run([1] * n)),
    ]
    for shift in (20, 32):

        def shifted(shift: int = shift) -> list[np.ndarray]:
            # Another sequence's cells first: ours land `shift` cells further (unified KV).
            probe.decode([(probe.prompt[q % n], q, 1, False) for q in range(shift)])
            return probe.run([n])

        cases.append((f"cells {shift} further (another sequence first)", shifted))
    neighbour = probe.prompt[:10] + probe.prompt[20:]
    cases.append(("another sequence in every batch", lambda: probe.run([n], neighbour)))
    layout = "per-sequence KV" if args.per_sequence_kv else "unified KV"
    print(f"{n}-token prompt, {layout}, flash attention {args.flash_attn}: largest logit difference")
    for name, case in cases:
        probe.fresh()
        print(f"  {name:48s} {difference(reference, case()):.3g}")


if __name__ == "__main__":
    main()
