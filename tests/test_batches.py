"""OpenAI's Files and Batch APIs on the embedded models (`tokenwire serve`), driven by the openai SDK.

Upload a JSONL file, create a batch, poll it, download the output and error files;
cancel mid-run; restart every process mid-run; bad files; another key. The model
is weak: these assert shapes, counts and custom_ids, never words.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests import harness

pytestmark = pytest.mark.models

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
KEY, OTHER_KEY = "batch-key-1", "batch-key-2"
DONE = ("completed", "failed", "cancelled", "expired")


def serve(data_dir: Path) -> harness.Serve:
    return harness.Serve(
        ["--log-level", "warning", "--data-dir", str(data_dir)], env={"TOKENWIRE_API_KEYS": f"{KEY},{OTHER_KEY}"}
    ).start()


@pytest.fixture(scope="module")
def served() -> Iterator[harness.Serve]:
    system = serve(Path(tempfile.mkdtemp(prefix="tokenwire-batches-")))
    yield system
    assert system.stop() == 0


def sdk(served: harness.Serve, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(served: harness.Serve) -> openai.OpenAI:
    return sdk(served)


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def chat_line(custom_id: str, content: str = "Name a colour.", max_tokens: int = 8) -> dict[str, Any]:
    body = {"model": CHAT, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return line(custom_id, "/v1/chat/completions", body)


def submit(client: openai.OpenAI, lines: list[Any], endpoint: str = "/v1/chat/completions") -> Any:
    uploaded = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.object == "file" and uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]


def finished(client: openai.OpenAI, batch_id: str, timeout: float = 300) -> Any:
    return harness.wait_until(
        lambda: (b := client.batches.retrieve(batch_id)).status in DONE and b,
        timeout,
        interval=0.3,
        what=f"batch {batch_id} finished",
    )


def results(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    """A result file's lines by custom_id (each custom_id at most once)."""
    if file_id is None:
        return {}
    lines = [json.loads(text) for text in client.files.content(file_id).text.splitlines()]
    by_id = {item["custom_id"]: item for item in lines}
    assert len(by_id) == len(lines), "a custom_id appears twice"
    return by_id


def test_a_chat_batch_runs_and_its_output_has_one_line_per_request(client: openai.OpenAI) -> None:
    batch = submit(client, [chat_line(f"req-{i}", f"Count to {i}.") for i in range(6)])
    assert batch.status == "validating" and batch.endpoint == "/v1/chat/completions"
    done = finished(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 6 and done.request_counts.completed == 6 and done.request_counts.failed == 0
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.error_file_id is None
    output = results(client, done.output_file_id)
    assert sorted(output) == [f"req-{i}" for i in range(6)]
    for item in output.values():
        assert item["error"] is None and item["response"]["status_code"] == 200
        body = item["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == CHAT
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert 0 < body["usage"]["completion_tokens"] <= 8
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    with pytest.raises(openai.BadRequestError):  # completed: nothing left to cancel
        client.batches.cancel(batch.id)


@pytest.mark.parametrize(
    ("endpoint", "body", "check"),
    [
        (
            "/v1/completions",
            {"model": CHAT, "prompt": "The sky is", "max_tokens": 5},
            lambda b: b["object"] == "text_completion" and b["choices"][0]["text"] is not None,
        ),
        (
            "/v1/embeddings",
            {"model": EMBED, "input": ["a red apple", "a green pear"]},
            lambda b: b["object"] == "list" and [len(d["embedding"]) for d in b["data"]] == [384, 384],
        ),
        (
            "/v1/responses",
            {"model": CHAT, "input": "Say hello.", "max_output_tokens": 8},
            lambda b: b["object"] == "response" and b["output"][0]["type"] == "message",
        ),
    ],
)
def test_completions_embeddings_and_responses_batches(client: openai.OpenAI, endpoint: str, body: dict, check) -> None:
    batch = submit(client, [line(f"{endpoint}-{i}", endpoint, body) for i in range(3)], endpoint)
    done = finished(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3, done
    output = results(client, done.output_file_id)
    assert len(output) == 3
    assert all(check(item["response"]["body"]) for item in output.values())


def test_a_file_with_bad_lines_fails_validation_with_each_line_named(client: openai.OpenAI) -> None:
    lines = [
        chat_line("ok"),
        b"{not json",
        chat_line("ok"),  # a duplicate custom_id
        line("wrong-url", "/v1/completions", {"model": CHAT, "prompt": "x"}),
        ["not", "an", "object"],
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},  # no custom_id
    ]
    done = finished(client, submit(client, lines).id)
    assert done.status == "failed" and done.failed_at and done.output_file_id is None
    problems = {(e.line, e.code) for e in done.errors.data}
    assert problems == {
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "invalid_url"),
        (5, "invalid_json_line"),
        (6, "missing_required_parameter"),
    }


def test_requests_the_api_refuses_go_to_the_error_file(client: openai.OpenAI) -> None:
    lines = [
        chat_line("good"),
        line(
            "unknown-model",
            "/v1/chat/completions",
            {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
        ),
        line(
            "bad-param",
            "/v1/chat/completions",
            {"model": CHAT, "messages": [{"role": "user", "content": "x"}], "temperature": 9},
        ),
        line(
            "streamed",
            "/v1/chat/completions",
            {"model": CHAT, "messages": [{"role": "user", "content": "x"}], "stream": True},
        ),
        line(
            "embedding-model", "/v1/chat/completions", {"model": EMBED, "messages": [{"role": "user", "content": "x"}]}
        ),
    ]
    done = finished(client, submit(client, lines).id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 4)
    assert list(results(client, done.output_file_id)) == ["good"]
    failed = results(client, done.error_file_id)
    statuses = {cid: item["response"]["status_code"] for cid, item in failed.items()}
    assert statuses == {"unknown-model": 404, "bad-param": 400, "streamed": 400, "embedding-model": 400}
    assert failed["unknown-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert failed["bad-param"]["response"]["body"]["error"]["param"] == "temperature"


def test_another_key_sees_nothing(client: openai.OpenAI, served: harness.Serve) -> None:
    batch = submit(client, [chat_line("mine")])
    other = sdk(served, OTHER_KEY)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(batch.input_file_id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(batch.input_file_id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.delete(batch.input_file_id)
    assert batch.id not in [b.id for b in other.batches.list()]
    assert batch.input_file_id not in [f.id for f in other.files.list()]
    with pytest.raises(openai.BadRequestError):  # nor can it run my file
        other.batches.create(
            input_file_id=batch.input_file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert batch.id in [b.id for b in client.batches.list()]
    finished(client, batch.id)


def test_bad_create_requests_are_400(client: openai.OpenAI) -> None:
    uploaded = client.files.create(file=("r.jsonl", jsonl([chat_line("x")])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as error:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/moderations", completion_window="24h")  # type: ignore[arg-type]
    assert error.value.body["param"] == "endpoint"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as error:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1h")  # type: ignore[arg-type]
    assert error.value.body["param"] == "completion_window"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as error:
        client.files.create(file=("r.jsonl", b"{}"), purpose="fine-tune")
    assert error.value.body["param"] == "purpose"  # type: ignore[index]
    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


@pytest.mark.timeout(600)  # a loaded machine: minutes until the first results
def test_cancel_mid_run_keeps_the_results_made(client: openai.OpenAI) -> None:
    batch = submit(client, [chat_line(f"long-{i}", "Write a long story.", max_tokens=24) for i in range(16)])
    harness.wait_until(
        lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, 300, interval=0.2, what="2 done"
    )
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = finished(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    made = done.request_counts.completed
    assert 2 <= made < 16
    output = results(client, done.output_file_id)
    assert len(output) == made and set(output) <= {f"long-{i}" for i in range(16)}
    assert client.batches.cancel(batch.id).status == "cancelled"  # again: the same answer


def committed(data_dir: Path, batch_id: str) -> dict[str, str]:
    """The results the store holds now, read as an operator would (sqlite3, read-only)."""
    db = sqlite3.connect(f"file:{data_dir / 'batches.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT custom_id, result FROM requests WHERE batch_id = ? AND result IS NOT NULL", (batch_id,)
        )
        return dict(rows.fetchall())
    finally:
        db.close()


@pytest.mark.timeout(900)  # two starts of serve on a loaded machine
def test_a_restart_of_every_process_loses_nothing_and_runs_nothing_twice() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="tokenwire-restart-"))
    first = serve(data_dir)
    try:
        client = sdk(first)
        batch = submit(
            client, [chat_line(f"r-{i}", f"Tell me about the number {i}.", max_tokens=24) for i in range(12)]
        )
        harness.wait_until(
            lambda: client.batches.retrieve(batch.id).request_counts.completed >= 3, 300, interval=0.2, what="3 done"
        )
    finally:
        assert first.process is not None
        os.killpg(first.process.pid, signal.SIGKILL)  # every process at once, mid-run
        first.stop(5)
    before = committed(data_dir, batch.id)
    assert 3 <= len(before) < 12
    second = serve(data_dir)
    try:
        client = sdk(second)
        done = finished(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 12
        output = results(client, done.output_file_id)
        assert sorted(output) == sorted(f"r-{i}" for i in range(12))
        for custom_id, result in before.items():  # the same result line, not a second run
            assert output[custom_id] == json.loads(result)
    finally:
        assert second.stop() == 0


def test_tokenwire_batch_submits_a_file_and_saves_the_results(served: harness.Serve, tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(
        jsonl(
            [
                chat_line("cli-1"),
                line(
                    "cli-2",
                    "/v1/chat/completions",
                    {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
                ),
            ]
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "tokenwire_cli", "batch", str(requests), "--url", f"{served.url}/v1"],
        env={**os.environ, "TOKENWIRE_API_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "2/2 (1 failed) completed" in done.stderr
    output = [json.loads(text) for text in (tmp_path / "requests.output.jsonl").read_text().splitlines()]
    errors = [json.loads(text) for text in (tmp_path / "requests.errors.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in output] == ["cli-1"] and output[0]["response"]["status_code"] == 200
    assert [e["custom_id"] for e in errors] == ["cli-2"] and errors[0]["response"]["status_code"] == 404
