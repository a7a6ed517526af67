"""Serving's own additions to the `sllm.errors` tree (mapped to HTTP by `sllm.api.errors`).

SllmError
├── InstanceError      500  an instance failed a request or stopped answering mid-way
├── ColdStartError     503  the instance for a request could not start (one line; log kept)
└── OverloadedError    503  (sllm.errors) no capacity / waited too long; Retry-After
    └── QueueFullError 429  too many requests already wait for this deployment
"""

from __future__ import annotations

from sllm.errors import OverloadedError, SllmError


class InstanceError(SllmError):
    status_code = 500
    error_type = "instance_error"


class ColdStartError(SllmError):
    status_code = 503
    error_type = "cold_start_error"


class QueueFullError(OverloadedError):
    status_code = 429
    error_type = "rate_limit_error"
