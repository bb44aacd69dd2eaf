"""Cache-aware routing against least-loaded: a seeded multi-turn trace over K workers (issue 30).

    .venv/bin/python -m bench.routing --setup llama-cpp               # tokenwire's own llama.cpp workers
    .venv/bin/python -m bench.routing --setup llama-server            # openai workers over llama-server
    .venv/bin/python -m bench.routing --setup llama-cpp --workload random
    .venv/bin/python -m bench.routing --index                         # the index alone: decision cost

The trace: T tenants, each with a system prompt of about ``--system-tokens`` tokens; S sessions per
tenant; ``--turns`` turns per session, each carrying the whole conversation with the model's real
previous replies; C sessions in flight (each runs its turns one after the other). Every turn is a
streamed chat request through the REST bridge. The random workload: closed-loop clients sending
one-turn prompts that share nothing.

Per routing it records: prompt tokens the engines evaluated, divided by prompt tokens sent (the
engines' own counters: the llama_cpp workers' GetStats, llama-server's ``/metrics``); TTFT p50 and
p90; the total time; each worker's share of requests; and the CPU other processes used meanwhile
(the machine is shared). Every worker runs one thread. The routings run one after the other on
fresh processes, in the order given (``--routings``), ``--rounds`` times, alternating.

Run from the repository root, in the project's venv. llama-server is built once into
``bench/.cache`` (``llama_server.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from bench import venv
from bench.servers import Group, Server, free_port, machine_busy, tokenwire

MODEL = "smollm2"
BENCH_SMG = Path(__file__).resolve().parent / ".venv" / "bin" / "smg"  # make bench's venv has it
WORDS = (
    "river garden stone window market letter winter silver forest harbor engine pocket candle "
    "meadow ladder basket thunder pepper violin orchard lantern mirror blanket saddle compass "
    "kettle ribbon marble feather cellar bridge tunnel island castle valley desert glacier"
).split()


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


# -- the trace -------------------------------------------------------------------------


@dataclass
class Session:
    tenant: int
    system: str
    questions: list[str]


def trace(args: argparse.Namespace) -> list[Session]:
    rng = random.Random(args.seed)
    # About 1.3 tokens a word for these words with SmolLM2's tokenizer.
    systems = [
        f"Tenant {t}'s assistant. Facts: {words(rng, int(args.system_tokens / 1.3))}" for t in range(args.tenants)
    ]
    sessions = [
        Session(t, systems[t], [f"Question {q}: {words(rng, 12)}?" for q in range(args.turns)])
        for t in range(args.tenants)
        for _ in range(args.sessions)
    ]
    rng.shuffle(sessions)
    return sessions


@dataclass
class Figures:
    ttfts: list[float] = field(default_factory=list)
    prompt_sent: int = 0
    cached_reported: int = 0
    requests: int = 0
    errors: int = 0


async def stream_turn(client: httpx.AsyncClient, body: dict[str, Any], figures: Figures) -> str:
    start, first, text, usage = time.perf_counter(), None, [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            figures.errors += 1
            await reply.aread()
            return ""
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    first = first or time.perf_counter()
                    text.append(content)
    figures.requests += 1
    if first is not None:
        figures.ttfts.append(first - start)
    if usage:
        figures.prompt_sent += usage["prompt_tokens"]
        figures.cached_reported += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return "".join(text)


async def run_trace(url: str, sessions: list[Session], args: argparse.Namespace, figures: Figures) -> None:
    limit = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800.0)) as client:

        async def session(s: Session) -> None:
            async with limit:
                messages: list[dict[str, str]] = [{"role": "system", "content": s.system}]
                for question in s.questions:
                    messages.append({"role": "user", "content": question})
                    body = {
                        "model": MODEL,
                        "messages": messages,
                        "max_tokens": args.max_tokens,
                        "temperature": 0,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                    reply = await stream_turn(client, body, figures)
                    messages.append({"role": "assistant", "content": reply})

        await asyncio.gather(*(session(s) for s in sessions))


async def run_random(url: str, args: argparse.Namespace, figures: Figures) -> None:
    rng = random.Random(args.seed)
    prompts = [words(rng, args.random_words) for _ in range(args.random_requests)]
    queue = list(prompts)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800.0)) as client:

        async def worker() -> None:
            while queue:
                prompt = queue.pop()
                body = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                await stream_turn(client, body, figures)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))


# -- the setups --------------------------------------------------------------------------


@dataclass
class Stack:
    url: str
    workers: list[Server]
    upstreams: list[str]  # llama-server base URLs (llama-server setup)
    upstream_servers: list[Server] = field(default_factory=list)


def worker_stats(address: str) -> Any:
    from tokenwire.v1 import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.WorkerServiceStub(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=10)


def llama_server_evaluated(base: str) -> int:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("llamacpp:prompt_tokens_total"):
                return int(float(line.split()[-1]))
    raise RuntimeError(f"{base}/metrics has no llamacpp:prompt_tokens_total")


def llama_server_requests(server: Server) -> int:
    """Tasks a llama-server's slots took, from its log: its metrics count tokens, not requests, and at
    the default verbosity it logs no request lines, but a slot's start of each task."""
    return sum(1 for line in server.log().splitlines() if "launch_slot_" in line and "processing task" in line)


def engine_counters(stack: Stack) -> tuple[int, list[int]]:
    """Prompt tokens the engines evaluated, and each worker's requests."""
    if stack.upstreams:
        evaluated = sum(llama_server_evaluated(u) for u in stack.upstreams)
    else:
        evaluated = sum(worker_stats(w.address).prompt_tokens_evaluated for w in stack.workers)
    if stack.workers:
        return evaluated, [worker_stats(w.address).requests_total for w in stack.workers]
    return evaluated, [llama_server_requests(s) for s in stack.upstream_servers]


def start_llama_servers(group: Group, args: argparse.Namespace) -> list[Server]:
    from bench.llama_server import ensure_llama_server
    from workers.engines.llama_cpp.loading import default_model_path

    binary, gguf = str(ensure_llama_server()), str(default_model_path())
    servers = []
    for k in range(args.workers):
        port = free_port()
        argv = [binary, "-m", gguf, "--port", str(port), "-c", str(args.n_ctx * args.parallel)]
        argv += ["-np", str(args.parallel), "-t", "1", "-tb", "1", "--metrics", "--alias", MODEL]
        argv += ["--cache-ram", "0"]  # KV bounded as on a GPU: no host-memory prompt cache
        servers.append(group.start(Server(f"llama-server-{k}", argv, ready_http=f"http://127.0.0.1:{port}/health")))
    return servers


def base_url(server: Server) -> str:
    assert server.ready_http is not None
    return server.ready_http.removesuffix("/health")


def start_smg(group: Group, args: argparse.Namespace, policy: str) -> Stack:
    """smg (SGLang's router, the Shepherd Model Gateway) over the same kind of llama-server upstreams."""
    servers = start_llama_servers(group, args)
    upstreams = [base_url(s) for s in servers]
    port = free_port()
    argv = [args.smg, "launch", "--host", "127.0.0.1", "--port", str(port), "--policy", policy]
    group.start(Server("smg", [*argv, "--worker-urls", *upstreams], ready_http=f"http://127.0.0.1:{port}/v1/models"))
    return Stack(f"http://127.0.0.1:{port}", [], upstreams, servers)


def start_stack(group: Group, args: argparse.Namespace, routing: str) -> Stack:
    if routing.startswith("smg-"):
        return start_smg(group, args, routing.removeprefix("smg-"))
    # A routing may carry gateway flags: "cache-aware --routing-margin-queue 2".
    gateway = group.start(tokenwire("gateway", "gateway", "--port", "0", "--routing", *routing.split()))
    servers = start_llama_servers(group, args) if args.setup == "llama-server" else []
    upstreams = [base_url(s) for s in servers]
    workers = []
    for k in range(args.workers):
        if upstreams:
            engine = ["--engine", "openai", "--upstream-url", f"{upstreams[k]}/v1", "--upstream-model", MODEL]
            engine += ["--limit-worker-concurrency", str(args.parallel)]
        else:
            engine = ["--engine", "llama_cpp", "--n-threads", "1", "--n-threads-batch", "1"]
            engine += ["--parallel", str(args.parallel), "--n-ctx", str(args.n_ctx)]
            # Bounded as on a GPU: the KV of the running sequences and of as many finished ones, no host copies.
            engine += ["--prefix-cache", str(args.parallel), "--prompt-cache-mib", "0"] if args.bounded else []
        argv = ["worker", "--port", "0", "--controller-address", gateway.address, "--model-name", MODEL]
        workers.append(group.start(tokenwire(f"worker-{k}", *argv, "--heartbeat-interval", "0.5", *engine)))
    bridge = group.start(tokenwire("bridge", "bridge", "--port", "0", "--gateway-address", gateway.address))
    url = f"http://{bridge.address}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # every worker registered
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        if any(m["id"] == MODEL and m.get("workers") == args.workers for m in models):
            break
        time.sleep(0.2)
    return Stack(url, workers, upstreams, servers)


def measure(args: argparse.Namespace, routing: str) -> dict[str, Any]:
    with Group() as group:
        stack = start_stack(group, args, routing)
        evaluated0, served0 = engine_counters(stack)
        figures = Figures()
        busy0, t0, client0 = machine_busy(), time.perf_counter(), time.process_time()
        cpu0 = sum(s.cpu() for s in group.servers)
        if args.workload == "trace":
            asyncio.run(run_trace(stack.url, trace(args), args, figures))
        else:
            asyncio.run(run_random(stack.url, args, figures))
        elapsed = time.perf_counter() - t0
        # Ours: the servers' CPU and this load client's own.
        ours = sum(s.cpu() for s in group.servers) - cpu0 + time.process_time() - client0
        others = max(machine_busy() - busy0 - ours, 0.0)
        evaluated1, served1 = engine_counters(stack)
    served = [b - a for a, b in zip(served0, served1, strict=True)]
    ttfts = sorted(figures.ttfts)
    return {
        "routing": routing,
        "requests": figures.requests,
        "errors": figures.errors,
        "prompt_sent": figures.prompt_sent,
        "evaluated": evaluated1 - evaluated0,
        "evaluated_share": (evaluated1 - evaluated0) / max(figures.prompt_sent, 1),
        "cached_reported": figures.cached_reported,
        "ttft_p50": statistics.median(ttfts) if ttfts else None,
        "ttft_p90": ttfts[int(len(ttfts) * 0.9)] if ttfts else None,
        "seconds": elapsed,
        "requests_per_s": figures.requests / elapsed,
        "shares": served,
        "others_cpu_s": others,
    }


def print_row(row: dict[str, Any]) -> None:
    mean = sum(row["shares"]) / max(len(row["shares"]), 1)
    print(
        f"{row['routing']:13s} evaluated {row['evaluated']:6d} / sent {row['prompt_sent']:6d} = "
        f"{row['evaluated_share']:6.1%}  TTFT p50 {row['ttft_p50']:.2f} s p90 {row['ttft_p90']:.2f} s  "
        f"total {row['seconds']:.0f} s ({row['requests_per_s']:.2f} req/s)  shares {row['shares']} "
        f"(max {max(row['shares']) / max(mean, 1e-9):.2f}x mean)  errors {row['errors']}  "
        f"other processes' CPU {row['others_cpu_s']:.0f} s",
        flush=True,
    )


# -- the index alone ----------------------------------------------------------------------


def index_cost(count: int = 100_000) -> None:
    """A decision's cost with ``count`` prefixes indexed (in-process, no workers)."""
    from gateway.routing import MemoryIndex, Router, chat_chain
    from tests.test_routing import Worker, chat, ended

    router = Router(MemoryIndex(2**30))
    pool: list[Any] = [Worker(f"127.0.0.1:{5000 + i}") for i in range(3)]
    requests: list[Any] = []
    while len(router.index) < count:  # type: ignore[arg-type]  # ~9 prefixes a conversation: 3 messages, 1 KiB blocks
        i = len(requests)
        request = chat(f"conversation {i} " + "word " * 1200, "reply " * 100, "next " * 30)
        route = router.route("m", [chat_chain(request)], 1)
        route.served(route.choose(pool, 0), ended(0, 2000, 0))
        requests.append(request)
    wall, cpu = [], []
    rng = random.Random(1)
    for _ in range(2000):
        request = rng.choice(requests)
        start, start_cpu = time.perf_counter(), time.thread_time()
        router.route("m", [chat_chain(request)], 1).choose(pool, 0)
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    entries = len(router.index)  # type: ignore[arg-type]
    # Wall time includes the waits for a core of a shared machine; CPU time is the decision's own cost.
    print(
        f"index: {entries} prefixes; a decision (a ~{len(request.SerializeToString()) // 1024} KiB request's chain, lookup, choice):"
    )
    for name, values in (("CPU", sorted(cpu)), ("wall", sorted(wall))):
        p50, p99 = values[len(values) // 2], values[int(len(values) * 0.99)]
        print(f"  {name}: p50 {p50 * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us, max {values[-1] * 1e6:.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", choices=("llama-cpp", "llama-server"), default="llama-cpp")
    parser.add_argument("--workload", choices=("trace", "random"), default="trace")
    parser.add_argument(
        "--routings", default="least-loaded,cache-aware", help="comma-separated, each with any gateway flags after it"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2, help="sequences (slots) per worker")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context per sequence")
    parser.add_argument("--bounded", action="store_true", help="llama-cpp: KV only, no host prompt cache")
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=600)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--random-requests", type=int, default=60)
    parser.add_argument("--random-words", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--smg", default=str(BENCH_SMG), help="smg's command, for the smg-<policy> routings (deps/bench.in)"
    )
    parser.add_argument("--index", action="store_true", help="measure the index alone")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.index:
        index_cost()
        return
    os.environ.setdefault("TOKENWIRE_LOG_LEVEL", "warning")
    if "smg-" in args.routings and args.smg == str(BENCH_SMG):
        venv.ensure()  # smg comes with bench/.venv (deps/bench.lock)
    rows = []
    for _ in range(args.rounds):
        for routing in args.routings.split(","):
            rows.append(measure(args, routing))
            print_row(rows[-1])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
