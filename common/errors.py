"""The one place where tokenwire errors are defined and mapped.

Domain code raises :class:`ApiError` (through the constructors below). The gRPC
servers turn it into a status with a ``google.rpc.ErrorInfo`` whose ``reason``
is the OpenAI error code; the REST bridge turns such a status back into
OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}`` with the
canonical HTTP status. A worker's error passes through the gateway unchanged.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "tokenwire"
_DETAILS_KEY = "grpc-status-details-bin"

# gRPC status -> (HTTP status, OpenAI error type).
_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}

# OpenAI codes whose HTTP status differs from their gRPC status's.
_HTTP_BY_CODE = {"request_too_large": 413, "file_too_large": 413}


class ApiError(Exception):
    """An error a client sees: a gRPC status plus OpenAI's type/param/code."""

    def __init__(
        self,
        status: grpc.StatusCode,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        retry_after: int | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self._http_status = http_status
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _HTTP.get(status, (500, "server_error"))[1]
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"ApiError({self.status.name}, {self.message!r}, code={self.code!r}, param={self.param!r})"

    # -- gRPC ---------------------------------------------------------------

    def to_rpc_status(self) -> status_pb2.Status:
        metadata = {"type": self.type}
        if self.code is not None:
            metadata["code"] = self.code
        if self.param is not None:
            metadata["param"] = self.param
        if self.retry_after is not None:
            metadata["retry_after"] = str(self.retry_after)
        info = error_details_pb2.ErrorInfo(reason=self.code or self.type, domain=DOMAIN, metadata=metadata)
        detail = any_pb2.Any()
        detail.Pack(info)
        details = [detail]
        if self.retry_after is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.seconds = self.retry_after
            retry_any = any_pb2.Any()
            retry_any.Pack(retry)
            details.append(retry_any)
        return status_pb2.Status(code=self.status.value[0], message=self.message, details=details)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return ((_DETAILS_KEY, self.to_rpc_status().SerializeToString()),)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ApiError:
        """Rebuild the error a peer sent (or describe a transport failure)."""
        code: grpc.StatusCode = error.code()
        message: str = error.details() or code.name.lower()
        trailing = error.trailing_metadata() or ()
        for key, value in trailing:
            if key != _DETAILS_KEY:
                continue
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == DOMAIN:
                    meta = info.metadata
                    if meta.get("code") == "cluster_unauthenticated":
                        # Our own misconfiguration, not the client's: never a 401 to a user.
                        return unavailable("A model worker refused this gateway's cluster credentials.")
                    retry = meta.get("retry_after")
                    return cls(
                        code,
                        status.message or message,
                        code=meta.get("code"),
                        param=meta.get("param"),
                        type=meta.get("type"),
                        retry_after=int(retry) if retry else None,
                    )
        if code == grpc.StatusCode.UNAVAILABLE:
            # gRPC's own text names the peer's address, which is cluster-internal: not for clients.
            return unavailable("A model worker is unavailable. Retry shortly.")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return deadline_exceeded()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # No ErrorInfo: gRPC's own refusal of a message over the size limit
            # ("Received/Sent message larger than max (N vs. M)"); ours all carry one.
            sizes = message.rsplit("(", 1)[-1].rstrip(")") if "(" in message else ""
            # gRPC says which end refused which way: "SERVER: Sent ..." / "CLIENT: Received ..." is a response.
            response = message.startswith(("SERVER: Sent", "CLIENT: Received"))
            return message_too_large(sizes, response=response)
        return cls(code, message)

    # -- HTTP ---------------------------------------------------------------

    @property
    def http_status(self) -> int:
        if self._http_status:
            return self._http_status
        if self.code in _HTTP_BY_CODE:  # a status that crossed gRPC: the code says what the status cannot
            return _HTTP_BY_CODE[self.code]
        return _HTTP.get(self.status, (500, "server_error"))[0]

    def envelope(self) -> dict[str, Any]:
        """OpenAI's error body: all four keys, null where empty."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- Constructors: the errors tokenwire raises ------------------------------


def unreachable(error: grpc.RpcError) -> bool:
    """Whether a call failed because its peer could not be reached (gRPC's own UNAVAILABLE: the
    connection refused, lost, or given up by keepalive), not because the peer answered so."""
    sent = any(key == _DETAILS_KEY for key, _ in error.trailing_metadata() or ())
    return bool(error.code() == grpc.StatusCode.UNAVAILABLE) and not sent


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message, param=param, code=code)


def request_too_large(limit: int) -> ApiError:
    return _refused_body(f"The request body is larger than the limit of {limit} bytes.", "request_too_large", 413)


def unsupported_media_type(given: str) -> ApiError:
    message = f"The request body must be JSON, sent with 'Content-Type: application/json', not {given!r}."
    return _refused_body(message, "unsupported_media_type", 415)


def _refused_body(message: str, code: str, http_status: int) -> ApiError:
    """A body the bridge refuses before reading it: an HTTP status of its own, no gRPC one."""
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message, code=code, http_status=http_status)


def host_not_allowed(host: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.PERMISSION_DENIED,
        f"Requests for host {host!r} are not served here: this server answers its loopback names "
        "and the names given with --allowed-hosts.",
        code="host_not_allowed",
        type="invalid_request_error",
    )


def invalid_api_key() -> ApiError:
    return ApiError(
        grpc.StatusCode.UNAUTHENTICATED,
        "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
        code="invalid_api_key",
        type="invalid_request_error",
    )


def cluster_unauthenticated() -> ApiError:
    """A registry or worker call without the cluster's credentials: no detail that helps guessing."""
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, "Cluster credentials required.", code="cluster_unauthenticated")


def not_owner(worker_id: str) -> ApiError:
    """A member acting on a worker that another credential registered."""
    return ApiError(
        grpc.StatusCode.PERMISSION_DENIED,
        f"The worker `{worker_id}` was registered with other credentials.",
        code="permission_denied",
    )


def missing_api_key() -> ApiError:
    # OpenAI's wording, and the same code as a wrong key: clients branch on it.
    return ApiError(
        grpc.StatusCode.UNAUTHENTICATED,
        "You didn't provide an API key. You need to provide your API key in an Authorization header "
        "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        code="invalid_api_key",
        type="invalid_request_error",
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def response_not_found(response_id: str, param: str | None = None) -> ApiError:
    """A stored response that is unknown, evicted, deleted, or another key's."""
    what = "Previous response" if param == "previous_response_id" else "Response"
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        f"{what} with id '{response_id}' not found.",
        code="previous_response_not_found" if param else "response_not_found",
        param=param,
    )


def wrong_model_kind(model: str, wanted: str) -> ApiError:
    return invalid_request(f"The model `{model}` does not support {wanted}.", param="model", code="model_not_supported")


def context_length_exceeded(
    context_length: int, prompt_tokens: int, max_tokens: int, param: str, *, at_least: bool = False
) -> ApiError:
    """``at_least``: ``prompt_tokens`` is a lower bound from the prompt's size (common/limits.py), not a count."""
    least = "at least " if at_least else ""
    return invalid_request(
        f"This model's maximum context length is {context_length} tokens. However, you requested "
        f"{least}{prompt_tokens + max_tokens} tokens ({least}{prompt_tokens} in the {param}, {max_tokens} for the "
        f"completion). Please reduce the length of the {param} or the completion.",
        param=param,
        code="context_length_exceeded",
    )


def embedding_input_too_long(index: int, tokens: int, limit: int, *, at_least: bool = False) -> ApiError:
    least = "at least " if at_least else ""
    return invalid_request(
        f"input[{index}] is {least}{tokens} tokens long; this model's maximum input length is {limit} tokens. "
        "Please reduce the length of the input.",
        param="input",
        code="context_length_exceeded",
    )


def embedding_request_too_long(tokens: int, limit: int, *, at_least: bool = False) -> ApiError:
    # OpenAI's wording and code for its 300,000-token limit per embeddings request.
    least = "at least " if at_least else ""
    return invalid_request(
        f"Requested {least}{tokens} tokens, max {limit} tokens per request",
        param="input",
        code="max_tokens_per_request",
    )


def message_too_large(sizes: str = "", *, response: bool = False) -> ApiError:
    """A gRPC message over a part's --max-receive/--max-send-message-length (gRPC's own
    RESOURCE_EXHAUSTED); ``response``: the answer was the one too large to send."""
    what = "The response to this request is" if response else "The request is"
    hint = " Ask for less at once (fewer inputs or choices)." if response else ""
    return ApiError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{what} larger than the server's gRPC message size limit" + (f" ({sizes} bytes)." if sizes else ".") + hint,
        code="request_too_large",
        type="invalid_request_error",
        http_status=413,
    )


def rate_limited(message: str, retry_after: int = 1) -> ApiError:
    return ApiError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, message, code="rate_limit_exceeded", retry_after=max(1, retry_after)
    )


def unavailable(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, message, code="service_unavailable")


def store_unavailable(message: str) -> ApiError:
    """The shared store (--store redis://...) did not answer: what needs it cannot be done now."""
    return ApiError(grpc.StatusCode.UNAVAILABLE, f"{message} Retry shortly.", code="store_unavailable", retry_after=1)


def too_many_connections(limit: int, retry_after: int = 1) -> ApiError:
    """The REST bridge holds its cap of open connections (``--max-connections``)."""
    return ApiError(
        grpc.StatusCode.UNAVAILABLE,
        f"This server holds its limit of {limit} open connections. Retry shortly.",
        code="too_many_connections",
        retry_after=retry_after,
    )


def request_read_timeout(seconds: float) -> ApiError:
    """A request's head or body did not arrive in time (``--request-read-timeout``)."""
    return ApiError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"The request was not received in time (limit: {seconds:g} s per read).",
        type="invalid_request_error",
        code="request_timeout",
        http_status=408,
    )


def no_worker(model: str) -> ApiError:
    return unavailable(f"No live worker serves the model `{model}` right now. Retry shortly.")


def deadline_exceeded() -> ApiError:
    return ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, "The request timed out.", code="timeout")


def internal(message: str = "The server had an error while processing your request.") -> ApiError:
    return ApiError(grpc.StatusCode.INTERNAL, message, code="internal_error")
