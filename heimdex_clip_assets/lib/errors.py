"""The pipeline's errors: the worker protocol's hierarchy plus what only the pipeline can hit.

Every error is a :class:`ClipError` with a stable ``code`` and a ``retryable`` flag, so retry logic,
Dagster failure metadata and the CLI's one-sentence messages all read the same two fields.
"""

from __future__ import annotations

from runpod_worker.protocol import (
    AuthError,
    ClipError,
    ConfigError,
    ImageDownloadError,
    ImageTooLargeError,
    InternalError,
    InvalidImageError,
    InvalidRequestError,
    ModelMismatchError,
)

__all__ = [
    "AuthError",
    "ClipError",
    "ConfigError",
    "DatabaseError",
    "ImageDownloadError",
    "ImageTooLargeError",
    "InternalError",
    "InvalidImageError",
    "InvalidRequestError",
    "InvalidVideoError",
    "ModelMismatchError",
    "NetworkError",
    "NotFoundError",
    "RemoteError",
    "StorageError",
    "TimeoutError",
]


class NetworkError(ClipError):
    """Could not reach a service (connection refused, DNS, TLS, reset)."""

    code = "network_error"
    retryable = True


class TimeoutError(ClipError):
    code = "timeout"
    retryable = True


class RemoteError(ClipError):
    """A service answered with an error we have no finer type for (HTTP 5xx, a FAILED job)."""

    code = "remote_error"
    retryable = True


class StorageError(ClipError):
    code = "storage_error"


class NotFoundError(ClipError):
    code = "not_found"


class DatabaseError(ClipError):
    code = "database_error"


class InvalidVideoError(ClipError):
    """The file is not a video we can decode (empty, corrupt, no video stream)."""

    code = "invalid_video"
