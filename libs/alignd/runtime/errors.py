"""Domain errors and the gRPC status each one maps to.

Engines and servicers raise these; the server interceptor turns them into a
status code and message (never INTERNAL for a request the caller got wrong).
"""

from __future__ import annotations

import grpc


class AligndError(Exception):
    """Base of errors that carry a gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AligndError):
    """The request is malformed; `field` names the offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class FailedPrecondition(AligndError):
    """The call cannot succeed until the system's state changes; do not retry."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(AligndError):
    """A bounded queue is full; retry later with backoff."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(AligndError):
    """The server cannot take the call now (loading, shutting down); retry."""

    code = grpc.StatusCode.UNAVAILABLE


class NotFound(AligndError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AligndError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(AligndError):
    """A concurrent operation conflicted (e.g. two weight updates at once)."""

    code = grpc.StatusCode.ABORTED


class Unimplemented(AligndError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(AligndError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(AligndError):
    """No valid credentials: a missing, unknown or revoked bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(AligndError):
    """Valid credentials without the scope the call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED
