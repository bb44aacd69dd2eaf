"""OpenAI's Files and Batch APIs: each route one BatchService call, its answer as OpenAI's JSON."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.datastructures import UploadFile

from common import errors
from rest_bridge import exchange, openapi
from tokenwire.v1 import batch_pb2, batch_pb2_grpc

router = APIRouter(tags=["batches"], responses=openapi.ERROR_RESPONSES)


def _stub(request: Request) -> batch_pb2_grpc.BatchServiceStub:
    return request.app.state.batch_stub


def _file(f: batch_pb2.File) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": f.object,
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": f.status,
        "expires_at": None,
        "status_details": None,
    }


def _optional(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def batch_object(b: batch_pb2.Batch) -> dict[str, Any]:
    """OpenAI's ``Batch``: every key present, null where unset."""
    errors_list = None
    if b.errors.data:
        errors_list = {
            "object": "list",
            "data": [
                {"code": e.code, "message": e.message, "param": _optional(e, "param"), "line": _optional(e, "line")}
                for e in b.errors.data
            ],
        }
    out: dict[str, Any] = {
        "id": b.id,
        "object": b.object,
        "endpoint": b.endpoint,
        "errors": errors_list,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "created_at": b.created_at,
    }
    for name in (
        "output_file_id",
        "error_file_id",
        "in_progress_at",
        "expires_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ):
        out[name] = _optional(b, name)
    counts = b.request_counts
    out["request_counts"] = {"total": counts.total, "completed": counts.completed, "failed": counts.failed}
    out["metadata"] = dict(b.metadata) or None
    return out


def _limit(request: Request) -> dict[str, int]:
    """The list request's ``limit`` field, when the query gives one."""
    text = request.query_params.get("limit")
    if text is None:
        return {}
    if not (text.isascii() and text.isdigit() and len(text) < 6):
        raise errors.invalid_request("'limit' must be a positive integer.", "limit")
    return {"limit": int(text)}


def _page(data: list[dict[str, Any]], has_more: bool) -> Response:
    """OpenAI's list page."""
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return exchange.json_response(
        {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more}
    )


async def _call(request: Request, rpc: str, message: Any) -> Any:
    call = getattr(_stub(request), rpc)(message, metadata=exchange.call_metadata(request))
    return await exchange.cancel_on_disconnect(request, call)


# -- files -------------------------------------------------------------------


@router.post("/v1/files", openapi_extra=openapi.FILE_UPLOAD)
async def create_file(request: Request) -> Response:
    """multipart/form-data: ``file`` (the JSONL) and ``purpose`` ("batch")."""
    max_bytes = exchange.settings(request).max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise errors.request_too_large(max_bytes)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise errors.invalid_request("POST /v1/files takes multipart/form-data with 'file' and 'purpose'.")
    async with request.form(max_files=1, max_fields=4) as form:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise errors.invalid_request("'file' is required: the file to upload.", "file")
        if not isinstance(purpose, str):
            raise errors.invalid_request("'purpose' is required.", "purpose")
        content = await upload.read(max_bytes + 1)
        if len(content) > max_bytes:
            raise errors.request_too_large(max_bytes)
        message = batch_pb2.CreateFileRequest(filename=upload.filename or "", purpose=purpose, content=content)
    reply = await _call(request, "CreateFile", message)
    return exchange.json_response(_file(reply.file))


@router.get("/v1/files")
async def list_files(request: Request) -> Response:
    query = request.query_params
    message = batch_pb2.ListFilesRequest(
        purpose=query.get("purpose", ""), after=query.get("after", ""), **_limit(request)
    )
    reply = await _call(request, "ListFiles", message)
    return _page([_file(f) for f in reply.data], reply.has_more)


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request) -> Response:
    reply = await _call(request, "GetFile", batch_pb2.GetFileRequest(file_id=file_id))
    return exchange.json_response(_file(reply.file))


@router.get("/v1/files/{file_id}/content")
async def get_file_content(file_id: str, request: Request) -> Response:
    """Streamed as the gateway reads it from disk: a file of any size, never whole in memory."""
    call = _stub(request).ReadFileContent(
        batch_pb2.ReadFileContentRequest(file_id=file_id), metadata=exchange.call_metadata(request)
    )
    first = await call.read()  # an unknown file fails here, before the response starts (404)

    async def chunks() -> AsyncIterator[bytes]:
        try:
            message = first
            while message is not grpc.aio.EOF:  # read() throughout: grpc.aio forbids mixing it with async for
                yield message.chunk
                message = await call.read()
        finally:
            call.cancel()  # the client went away: the gateway stops reading

    return StreamingResponse(chunks(), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> Response:
    reply = await _call(request, "DeleteFile", batch_pb2.DeleteFileRequest(file_id=file_id))
    return exchange.json_response({"id": reply.id, "object": reply.object, "deleted": reply.deleted})


# -- batches -----------------------------------------------------------------


@router.post("/v1/batches", openapi_extra=openapi.body(openapi.BATCH))
async def create_batch(request: Request) -> Response:
    body = await exchange.read_json(request)
    fields = {}
    for name in ("input_file_id", "endpoint", "completion_window"):
        value = body.get(name)
        if not isinstance(value, str):
            raise errors.invalid_request(f"'{name}' is required: a string.", name)
        fields[name] = value
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise errors.invalid_request("'metadata' must be an object of strings.", "metadata")
    message = batch_pb2.CreateBatchRequest(**fields, metadata=metadata)
    reply = await _call(request, "CreateBatch", message)
    return exchange.json_response(batch_object(reply.batch))


@router.get("/v1/batches")
async def list_batches(request: Request) -> Response:
    message = batch_pb2.ListBatchesRequest(after=request.query_params.get("after", ""), **_limit(request))
    reply = await _call(request, "ListBatches", message)
    return _page([batch_object(b) for b in reply.data], reply.has_more)


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request) -> Response:
    reply = await _call(request, "GetBatch", batch_pb2.GetBatchRequest(batch_id=batch_id))
    return exchange.json_response(batch_object(reply.batch))


# Declared by hand: the id's shape gives the fuzzer invalid ids to try (a bodiless POST has nothing else).
BATCH_ID = {
    "parameters": [
        {
            "name": "batch_id",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": "^batch_[A-Za-z0-9]+$"},
        }
    ]
}


@router.post("/v1/batches/{batch_id}/cancel", openapi_extra=BATCH_ID)
async def cancel_batch(request: Request) -> Response:
    batch_id = request.path_params["batch_id"]
    reply = await _call(request, "CancelBatch", batch_pb2.CancelBatchRequest(batch_id=batch_id))
    return exchange.json_response(batch_object(reply.batch))
