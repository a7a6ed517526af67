"""The one error hierarchy of sllm's services.

    SllmError                      anything sllm raises on purpose
    ├── InvalidRequestError  400   the client sent something we will not run (names the field)
    ├── NotFoundError        404   unknown job, model, deployment or adapter
    ├── ConflictError        409   the request clashes with the object's state
    ├── TooLargeError        413   an upload over the server's limit
    └── OverloadedError      503   no capacity right now; retry later (carries retry_after)

Services raise these; `sllm.api.errors` maps them to HTTP in exactly one place.
"""

from __future__ import annotations


class SllmError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(SllmError):
    status_code = 400
    error_type = "invalid_request_error"


class NotFoundError(SllmError):
    status_code = 404
    error_type = "not_found_error"


class ConflictError(SllmError):
    status_code = 409
    error_type = "conflict_error"


class TooLargeError(SllmError):
    status_code = 413
    error_type = "request_too_large"


class OverloadedError(SllmError):
    status_code = 503
    error_type = "overloaded_error"

    def __init__(self, message: str, *, retry_after: float = 1.0, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after = retry_after
