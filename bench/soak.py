"""A soak: `make serve` (the real models) for an hour under a mixed load. Does anything leak or fail?

    .venv/bin/python bench/soak.py                      # 60 minutes, figures every minute
    .venv/bin/python bench/soak.py --minutes 3 --warmup-minutes 1 --sample-seconds 10   # CI's version

It starts ``make serve`` as a user does (SmolLM2 on llama.cpp, MiniLM embeddings; two API keys
from a keys file: one for the load, one limited to --burst-rpm requests a minute), and runs at
once, for --minutes:

- chat: non-streamed chat completions (max_tokens 4-24), two clients back to back;
- streams: streamed chat (max_tokens 8-32), two clients, about a third cancelled by the client after
  1-4 chunks (it closes the connection);
- embeddings: 1-8 inputs, one request a second or less;
- Responses chains: three turns, each through the previous one's ``previous_response_id``, one client;
- bad bodies: broken JSON, wrong types, out-of-range values, an unknown model (4xx expected), two a
  second or less;
- once a minute, a burst of twice the limited key's rpm (429 expected past the limit).

Every --sample-seconds it records each process's RSS and open file descriptors (``/proc``), the
workers' calls in flight and queued, sequences running and KV cells in use (``GetStats``, with the
cluster token ``serve`` made), the machine's load, and the status codes so far. Then it stops the
load, waits for the workers to settle, and gives a verdict:

- 0 x 5xx: no HTTP 5xx, and no error event of type ``server_error`` inside a 200 stream;
- 0 slots or KV cells held after the load stops: calls in flight, queued, sequences running, KV
  cells in use (cells kept for cached prefixes are a cache, not held);
- RSS growth per hour after warm-up under --rss-bound-mib-per-hour for every process, from the
  least-squares slope of its samples after --warmup-minutes (the chat worker's net of its prompt
  cache, a cache bounded by llama_cpp's --prompt-cache-mib), and no part restarted. Judged only
  over --judge-after-minutes or more after the warm-up: a few minutes cannot tell a leak (a short
  run says NOT JUDGED, with the figures).

It writes ``samples.jsonl`` and ``summary.json`` to --out and prints a report in Markdown with the
verdict lines (``bench/RESULTS.md`` keeps an hour's). Exit status 0 when every verdict line passes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from tokenwire.v1 import registry_pb2, registry_pb2_grpc, worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
LOAD_KEY, BURST_KEY = "sk-soak-load", "sk-soak-burst"
CHAT_MODEL, EMBED_MODEL = "smollm2-135m-instruct", "all-minilm-l6-v2"
WORDS = (
    "the a cat dog river city light music paper window morning garden story number language cloud "
    "question answer bridge train market winter summer friend teacher doctor ocean mountain road"
).split()


# -- the server ------------------------------------------------------------------------


@dataclass
class Serve:
    """``make serve`` in a session of its own; what its banner says."""

    process: subprocess.Popen[str]
    url: str = ""
    registry: str = ""
    token_file: str = ""
    output: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, keys_file: Path, timeout: float) -> Serve:
        args = f"--port 0 --grpc-port 0 --api-keys-file {keys_file}"
        process = subprocess.Popen(
            ["make", "-s", "serve", f"ARGS={args}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # Ctrl-C, as a user gives it, goes to this group only
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        serve = cls(process)
        deadline = time.monotonic() + timeout
        assert process.stdout is not None
        for line in process.stdout:
            serve.output.append(line)
            text = line.strip()
            if text.startswith("OpenAI REST API"):
                serve.url = text.split()[3].removesuffix("/v1")
            elif text.startswith("cluster "):
                serve.registry = text.split()[2]
                serve.token_file = text.split("(token: ", 1)[1].rstrip(")")
            elif "Press Ctrl-C to stop." in text:
                break
            if time.monotonic() > deadline:
                break
        if not (serve.url and serve.registry):
            serve.stop()
            raise SystemExit("make serve did not get ready:\n" + "".join(serve.output[-40:]))
        # Keep reading its output (logs): a full pipe would stall it.
        threading.Thread(target=serve._drain, daemon=True).start()
        return serve

    def _drain(self) -> None:
        for line in self.process.stdout or ():
            self.output.append(line)

    @property
    def token(self) -> str:
        return Path(self.token_file).read_text().strip()

    def processes(self) -> dict[str, int]:
        """name -> pid of serve and every part under it."""
        parents: dict[int, int] = {}
        lines: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                lines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        found: dict[str, int] = {}
        frontier = [self.process.pid]
        while frontier:
            pid = frontier.pop()
            for child, parent in parents.items():
                if parent == pid:
                    frontier.append(child)
                    name = _part_name(lines.get(child, ""))
                    if name:
                        found[name] = child
        return found

    def stop(self, timeout: float = 120.0) -> int | None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def _part_name(cmdline: str) -> str:
    if " -m tokenwire_cli " not in f" {cmdline} " and "bin/tokenwire " not in cmdline:
        return ""
    if " serve" in cmdline:
        return "serve"
    if " front-end" in cmdline:
        return "front end"
    if " gateway" in cmdline:
        return "gateway"
    if " bridge" in cmdline:
        return "bridge"
    if re.search(r"--engine[ =]llama_cpp\b", cmdline):
        return "chat worker"
    if re.search(r"--engine[ =]embeddings\b", cmdline):
        return "embedding worker"
    return ""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the load ------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes by (kind, status): HTTP statuses, and for streams what ended them."""

    counts: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # what each 5xx said (the first 50)
    ttft: list[float] = field(default_factory=list)

    def add(self, kind: str, status: int | str, detail: str = "") -> None:
        self.counts[f"{kind} {status}"] += 1
        if (isinstance(status, int) and status >= 500) or status == "server_error":
            if len(self.server_errors) < 50:
                self.server_errors.append(f"{kind} {status}: {detail[:300]}")

    def fives(self) -> int:
        return sum(n for key, n in self.counts.items() if re.search(r" (5\d\d|server_error)$", key))

    def total(self) -> int:
        return sum(self.counts.values())


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


class Load:
    def __init__(self, url: str, tally: Tally, seed: int, burst_rpm: int) -> None:
        self.url = url
        self.tally = tally
        self.rng = random.Random(seed)
        self.burst_rpm = burst_rpm
        self.stop = asyncio.Event()
        self.client = httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {LOAD_KEY}"},
            timeout=httpx.Timeout(120, connect=10),
            limits=httpx.Limits(max_connections=64),
        )

    async def _post(self, kind: str, path: str, body: Any, **kwargs: Any) -> httpx.Response | None:
        try:
            reply = await self.client.post(path, json=body, **kwargs)
        except httpx.HTTPError as error:
            self.tally.add(kind, "transport_error", repr(error))
            return None
        self.tally.add(kind, reply.status_code, reply.text)
        return reply

    async def chat(self) -> None:
        body = {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": _text(self.rng, self.rng.randint(3, 30))}],
            "max_tokens": self.rng.randint(4, 24),
            "temperature": self.rng.choice([0, 0.7]),
        }
        await self._post("chat", "/v1/chat/completions", body)

    async def stream(self) -> None:
        body = {
            "model": CHAT_MODEL,
            "stream": True,
            "messages": [{"role": "user", "content": _text(self.rng, self.rng.randint(3, 30))}],
            "max_tokens": self.rng.randint(8, 32),
        }
        cancel_after = self.rng.randint(1, 4) if self.rng.random() < 0.35 else None
        started = time.monotonic()
        chunks = 0
        try:
            async with self.client.stream("POST", "/v1/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    await reply.aread()
                    self.tally.add("stream", reply.status_code, reply.text)
                    return
                async for line in reply.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        self.tally.add("stream", 200)
                        return
                    event = json.loads(data)
                    if "error" in event:
                        self.tally.add("stream", event["error"].get("type") or "error", data)
                        continue
                    if event.get("choices") and event["choices"][0]["delta"].get("content"):
                        if chunks == 0:
                            self.tally.ttft.append(time.monotonic() - started)
                        chunks += 1
                        if cancel_after is not None and chunks >= cancel_after:
                            self.tally.add("stream", "cancelled by the client")
                            return  # leaving the block closes the connection
                self.tally.add("stream", "ended without [DONE]")
        except httpx.HTTPError as error:
            self.tally.add("stream", "transport_error", repr(error))

    async def embeddings(self) -> None:
        inputs = [_text(self.rng, self.rng.randint(3, 40)) for _ in range(self.rng.randint(1, 8))]
        await self._post("embeddings", "/v1/embeddings", {"model": EMBED_MODEL, "input": inputs})

    async def responses_chain(self) -> None:
        previous = None
        for _turn in range(3):
            body: dict[str, Any] = {
                "model": CHAT_MODEL,
                "input": _text(self.rng, self.rng.randint(3, 15)),
                "max_output_tokens": self.rng.randint(4, 16),
            }
            if previous:
                body["previous_response_id"] = previous
            reply = await self._post("responses", "/v1/responses", body)
            if reply is None or reply.status_code != 200:
                return
            previous = reply.json()["id"]

    async def bad_body(self) -> None:
        headers = {"Content-Type": "application/json"}
        kind = self.rng.choice(["broken json", "wrong type", "out of range", "unknown model"])
        if kind == "broken json":
            content = b'{"model": "' + CHAT_MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}'
            try:
                reply = await self.client.post("/v1/chat/completions", content=content, headers=headers)
            except httpx.HTTPError as error:
                self.tally.add("bad body", "transport_error", repr(error))
                return
            self.tally.add("bad body", reply.status_code, reply.text)
            return
        body: dict[str, Any] = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}
        if kind == "wrong type":
            body["messages"] = "hi"
        elif kind == "out of range":
            body["temperature"] = 7
        else:
            body["model"] = "no-such-model"
        await self._post("bad body", "/v1/chat/completions", body)

    async def burst(self) -> None:
        """Twice the limited key's rpm, at once: the first ones pass, the rest get 429."""
        body = {"model": EMBED_MODEL, "input": ["burst"]}
        headers = {"Authorization": f"Bearer {BURST_KEY}"}
        await asyncio.gather(
            *(self._post("burst", "/v1/embeddings", body, headers=headers) for _ in range(2 * self.burst_rpm))
        )

    async def loop(self, action: Any, pause: float = 0.0) -> None:
        while not self.stop.is_set():
            await action()
            if pause:
                await asyncio.sleep(pause)

    async def bursts(self) -> None:
        while not self.stop.is_set():
            await self.burst()
            try:
                await asyncio.wait_for(self.stop.wait(), 60)
            except TimeoutError:
                pass

    async def run(self, seconds: float) -> None:
        tasks = [
            *(asyncio.create_task(self.loop(self.chat)) for _ in range(2)),
            *(asyncio.create_task(self.loop(self.stream)) for _ in range(2)),
            asyncio.create_task(self.loop(self.embeddings, pause=1.0)),
            asyncio.create_task(self.loop(self.responses_chain)),
            asyncio.create_task(self.loop(self.bad_body, pause=0.5)),
            asyncio.create_task(self.bursts()),
        ]
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            pass
        self.stop.set()
        await asyncio.gather(*tasks)
        await self.client.aclose()


# -- the figures ------------------------------------------------------------------------


async def worker_stats(serve: Serve) -> dict[str, dict[str, int]]:
    """model -> the worker's GetStats figures that say what it holds."""
    metadata = (("x-tokenwire-cluster-token", serve.token),)
    out: dict[str, dict[str, int]] = {}
    async with grpc.aio.insecure_channel(serve.registry) as channel:
        listed = await registry_pb2_grpc.RegistryServiceStub(channel).ListWorkers(
            registry_pb2.ListWorkersRequest(), metadata=metadata, timeout=10
        )
    for worker in listed.workers:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stats = await worker_pb2_grpc.WorkerServiceStub(channel).GetStats(
                worker_pb2.GetStatsRequest(), metadata=metadata, timeout=10
            )
        out[worker.model.name] = {
            "in_flight": stats.in_flight,
            "queued": stats.queue_length,
            "sequences_running": stats.running_sequences,
            "sequences_waiting": stats.waiting_sequences,
            "kv_cells_in_use": stats.kv_cells_in_use,
            "kv_cells_cached": stats.kv_cells_cached,
            "prompt_cache_bytes": stats.prompt_cache_bytes,
            "requests_total": stats.requests_total,
        }
    return out


def held(stats: dict[str, dict[str, int]]) -> int:
    keys = ("in_flight", "queued", "sequences_running", "sequences_waiting", "kv_cells_in_use")
    return sum(figures[k] for figures in stats.values() for k in keys)


async def sample(serve: Serve, tally: Tally, started: float) -> dict[str, Any]:
    processes = {}
    for name, pid in serve.processes().items():
        try:
            processes[name] = {"pid": pid, "rss_mib": round(rss_mib(pid), 1), "fds": open_fds(pid)}
        except OSError:
            pass
    try:
        workers = await worker_stats(serve)
    except grpc.aio.AioRpcError as error:
        workers = {"error": {"code": error.code().value[0]}}
    if "chat worker" in processes and CHAT_MODEL in workers:
        # A bounded cache (llama_cpp --prompt-cache-mib), not a leak: judged apart from the rest.
        processes["chat worker"]["prompt_cache_mib"] = round(workers[CHAT_MODEL]["prompt_cache_bytes"] / 2**20, 1)
    return {
        "minute": round((time.monotonic() - started) / 60, 2),
        "load_average": os.getloadavg()[0],
        "processes": processes,
        "workers": workers,
        "requests": tally.total(),
        "statuses": dict(tally.counts),
    }


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minute, MiB), in MiB per hour."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return 60 * sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def verdict(
    samples: list[dict[str, Any]], settled: dict[str, Any], tally: Tally, args: argparse.Namespace
) -> dict[str, Any]:
    after = [s for s in samples if s["minute"] >= args.warmup_minutes]
    growth = {}
    for name in sorted({n for s in samples for n in s["processes"]}):
        mine = [s["processes"][name] for s in after if name in s["processes"]]
        minutes = [s["minute"] for s in after if name in s["processes"]]
        net = [p["rss_mib"] - p.get("prompt_cache_mib", 0.0) for p in mine]
        pids = {s["processes"][name]["pid"] for s in samples if name in s["processes"]}
        growth[name] = {
            "mib_per_hour": round(slope_per_hour(list(zip(minutes, net, strict=True))), 1),
            "raw_mib_per_hour": round(
                slope_per_hour([(m, p["rss_mib"]) for m, p in zip(minutes, mine, strict=True)]), 1
            ),
            "first_mib": mine[0]["rss_mib"] if mine else None,
            "last_mib": mine[-1]["rss_mib"] if mine else None,
            "prompt_cache_mib": [mine[0].get("prompt_cache_mib"), mine[-1].get("prompt_cache_mib")] if mine else None,
            "samples": len(mine),
            "pids": len(pids),  # more than one: serve restarted it
        }
    fives = tally.fives()
    held_after = held(settled["workers"]) if "error" not in settled["workers"] else -1
    judged_minutes = (after[-1]["minute"] - after[0]["minute"]) if len(after) > 1 else 0.0
    rss_ok = all(g["mib_per_hour"] <= args.rss_bound_mib_per_hour and g["pids"] == 1 for g in growth.values())
    figures = ", ".join(f"{name} {g['mib_per_hour']:+.1f}" for name, g in growth.items())
    if judged_minutes >= args.judge_after_minutes:
        rss_line = (
            f"{'PASS' if rss_ok else 'FAIL'}: RSS growth per hour after {args.warmup_minutes:g} min of warm-up "
            f"(the chat worker's net of its prompt cache), at most {args.rss_bound_mib_per_hour:g} MiB/h: {figures}"
        )
    else:
        rss_ok = all(g["pids"] == 1 for g in growth.values())  # no part restarted, at least
        rss_ok_text = "no part restarted" if rss_ok else "FAIL: a part restarted"
        rss_line = (
            f"NOT JUDGED: RSS growth per hour over {judged_minutes:.1f} min after warm-up, fewer than "
            f"{args.judge_after_minutes:g} (too short to tell a leak; {rss_ok_text}): {figures}"
        )
    lines = [
        f"{'PASS' if fives == 0 else 'FAIL'}: {fives} x 5xx in {tally.total():,} requests",
        f"{'PASS' if held_after == 0 else 'FAIL'}: {held_after} slots, sequences or KV cells held "
        f"{settled['seconds']:.0f} s after the load stopped",
        rss_line,
    ]
    return {"pass": fives == 0 and held_after == 0 and rss_ok, "lines": lines, "rss": growth, "fives": fives}


def report(summary: dict[str, Any]) -> str:
    v = summary["verdict"]
    out = [f"### Soak: {summary['minutes']:g} minutes of `make serve`", ""]
    out += [f"- {line}" for line in v["lines"]]
    out += ["", f"Requests: {summary['requests']:,} ({summary['requests_per_minute']:.0f} a minute); "
            f"machine load average {summary['load_average_mean']:.1f} on {os.cpu_count()} cores.", ""]  # fmt: skip
    out += ["| outcome | count |", "|---|---:|"]
    out += [f"| {key} | {n:,} |" for key, n in sorted(summary["statuses"].items())]
    out += [
        "",
        "| process | RSS after warm-up (MiB) | RSS at the end (MiB) | of which prompt cache (MiB) "
        "| growth, net of the cache (MiB/h) | fds at start / end |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, g in v["rss"].items():
        fds = summary["fds"].get(name, ["-", "-"])
        cache = g["prompt_cache_mib"] or [None, None]
        cache_text = "-" if cache[1] is None else f"{cache[0]} -> {cache[1]}"
        out.append(
            f"| {name} | {g['first_mib']} | {g['last_mib']} | {cache_text} | {g['mib_per_hour']:+.1f} "
            f"| {fds[0]} / {fds[1]} |"
        )
    if summary["ttft_p50_ms"] is not None:
        out += [
            "",
            f"Streams' time to first token: p50 {summary['ttft_p50_ms']:.0f} ms, p99 {summary['ttft_p99_ms']:.0f} ms.",
        ]
    if summary["server_errors"]:
        out += ["", "5xx seen:", *(f"- {e}" for e in summary["server_errors"])]
    return "\n".join(out)


async def soak(serve: Serve, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    samples: list[dict[str, Any]] = []
    tally = Tally()
    print(f"[soak] serving at {serve.url}; {args.minutes:g} min of load", file=sys.stderr, flush=True)
    load = Load(serve.url, tally, args.seed, args.burst_rpm)
    started = time.monotonic()
    running = asyncio.create_task(load.run(args.minutes * 60))
    log = out / "samples.jsonl"
    await asyncio.to_thread(_write, log, "")
    while not running.done():
        record = await sample(serve, tally, started)
        samples.append(record)
        await asyncio.to_thread(_append, log, json.dumps(record) + "\n")  # as it comes: a crash keeps them
        rss = ", ".join(f"{n} {p['rss_mib']:.0f}" for n, p in record["processes"].items())
        print(f"[soak] {record['minute']:6.2f} min: {record['requests']:,} requests, {tally.fives()} x 5xx; "
              f"RSS MiB: {rss}; load {record['load_average']:.1f}", file=sys.stderr, flush=True)  # fmt: skip
        await asyncio.wait([running], timeout=args.sample_seconds)
    await running
    load_seconds = time.monotonic() - started
    # The load has stopped: what do the workers still hold?
    settle_started = time.monotonic()
    while True:
        workers = await worker_stats(serve)
        if held(workers) == 0 or time.monotonic() - settle_started > args.settle_seconds:
            break
        await asyncio.sleep(0.5)
    settled = {"workers": workers, "seconds": time.monotonic() - settle_started}
    final = await sample(serve, tally, started)
    samples.append(final)
    await asyncio.to_thread(_append, log, json.dumps(final) + "\n")
    ttft = sorted(tally.ttft)
    return {
        "minutes": args.minutes,
        "requests": tally.total(),
        "requests_per_minute": tally.total() / (load_seconds / 60),
        "statuses": dict(tally.counts),
        "server_errors": tally.server_errors,
        "settled": settled,
        "load_average_mean": sum(s["load_average"] for s in samples) / len(samples),
        "fds": {
            name: [samples[0]["processes"].get(name, {}).get("fds", "-"), final["processes"][name]["fds"]]
            for name in final["processes"]
        },
        "ttft_p50_ms": 1000 * ttft[len(ttft) // 2] if ttft else None,
        "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))] if ttft else None,
        "verdict": verdict(samples, settled, tally, args),
    }


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _append(path: Path, text: str) -> None:
    with path.open("a") as handle:
        handle.write(text)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="how long the load runs (default 60)")
    parser.add_argument("--warmup-minutes", type=float, default=10.0, help="RSS growth is judged after this")
    parser.add_argument(
        "--judge-after-minutes",
        type=float,
        default=10.0,
        help="RSS growth is judged only over at least this many minutes after warm-up (default 10)",
    )
    parser.add_argument("--sample-seconds", type=float, default=60.0, help="figures every this many seconds")
    parser.add_argument(
        "--rss-bound-mib-per-hour", type=float, default=32.0, help="the most RSS growth a process may show (MiB/h)"
    )
    parser.add_argument("--burst-rpm", type=int, default=30, help="the limited key's requests a minute")
    parser.add_argument("--settle-seconds", type=float, default=30.0, help="how long the workers may take to let go")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds make serve may take to start")
    parser.add_argument("--seed", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "soak"), help="where samples and summary go")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = Path(tempfile.mkstemp(prefix="tokenwire-soak-keys-")[1])
    keys.write_text(f"{LOAD_KEY}\n{BURST_KEY} rpm={args.burst_rpm}\n")
    print("[soak] starting make serve", file=sys.stderr, flush=True)
    serve = Serve.start(keys, timeout=args.start_timeout)
    try:
        summary = asyncio.run(soak(serve, args))
    finally:
        code = serve.stop()
        keys.unlink(missing_ok=True)
        print(f"[soak] make serve stopped ({code})", file=sys.stderr, flush=True)
    summary["serve_exit"] = code
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = report(summary)
    (out / "report.md").write_text(text + "\n")
    print(text)
    return 0 if summary["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
