"""``tokenwire batch``: run a JSONL file of requests as a batch through the REST API, with a progress bar.

It is a client of the public API only (POST /v1/files, POST /v1/batches, GET /v1/batches/{id},
GET /v1/files/{id}/content), so it works against any tokenwire, or OpenAI itself.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

FINAL = ("completed", "failed", "expired", "cancelled")
BAR = 30


class BatchFailed(SystemExit):
    pass


def _check(reply: httpx.Response) -> Any:
    if reply.status_code >= 400:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text
        raise BatchFailed(f"{reply.request.method} {reply.request.url.path}: {reply.status_code} {message}")
    return reply.json()


def endpoint_of(path: Path) -> str:
    """The ``url`` of the file's first request: every line of a batch has the same."""
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError):
                    break
                if isinstance(url, str):
                    return url
                break
    raise BatchFailed(f"{path}: the first line has no 'url'; give --endpoint")


def progress(batch: dict[str, Any]) -> str:
    counts = batch["request_counts"]
    total, done, failed = counts["total"], counts["completed"], counts["failed"]
    filled = BAR * (done + failed) // total if total else 0
    return f"[{'#' * filled}{'.' * (BAR - filled)}] {done + failed}/{total} ({failed} failed) {batch['status']}"


def run_batch(
    url: str,
    path: Path,
    *,
    api_key: str | None,
    endpoint: str | None,
    output: Path,
    errors: Path,
    interval: float = 1.0,
    out: TextIO = sys.stderr,
) -> dict[str, Any]:
    """Upload, create, follow until the batch ends, save the output and error files; the final batch."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=60) as client:
        with path.open("rb") as handle:
            uploaded = _check(client.post("/files", files={"file": (path.name, handle)}, data={"purpose": "batch"}))
        body = {"input_file_id": uploaded["id"], "endpoint": endpoint or endpoint_of(path), "completion_window": "24h"}
        batch = _check(client.post("/batches", json=body))
        print(f"batch {batch['id']}: {path} ({uploaded['bytes']} bytes) to {body['endpoint']}", file=out)
        try:
            while batch["status"] not in FINAL:
                print(f"\r{progress(batch)}", end="", file=out, flush=True)
                time.sleep(interval)  # the pace of the polls
                batch = _check(client.get(f"/batches/{batch['id']}"))
        except KeyboardInterrupt:
            print(f"\ncancelling {batch['id']} (the results made so far are kept)", file=out)
            batch = _check(client.post(f"/batches/{batch['id']}/cancel"))
            while batch["status"] not in FINAL:
                time.sleep(interval)
                batch = _check(client.get(f"/batches/{batch['id']}"))
        print(f"\r{progress(batch)}", file=out)
        for file_id, target in ((batch.get("output_file_id"), output), (batch.get("error_file_id"), errors)):
            if file_id:
                reply = client.get(f"/files/{file_id}/content")
                if reply.status_code >= 400:
                    _check(reply)
                target.write_bytes(reply.content)
                print(f"wrote {target}", file=out)
        for problem in (batch.get("errors") or {}).get("data") or []:
            print(f"line {problem.get('line')}: {problem['code']}: {problem['message']}", file=out)
    return batch
