"""Errors: one hierarchy for the worker and the pipeline.

Every error is a :class:`ClipError` with a stable ``code`` and a ``retryable`` flag, so retry logic,
Dagster failure metadata, the CLI's one-sentence messages and a failed RunPod job all read the same two
fields. A whole-job failure travels as ``{"error": "<JSON of {code, message, retryable}>"}``, which
RunPod turns into a FAILED job; :func:`parse_remote_error` reads it back, and RunPod's own shapes too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class ClipError(Exception):
    """Base of every error the project raises on purpose.

    ``code`` is stable (clients switch on it), ``retryable`` says whether the same call may succeed
    later, and the message is for people: it says what went wrong and what to do, and never holds a
    secret or a traceback.
    """

    code: str = "internal_error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class AuthError(ClipError):
    code = "auth_failed"


class InvalidRequestError(ClipError):
    code = "invalid_request"


class ImageDownloadError(ClipError):
    code = "image_download_failed"
    retryable = True


class ImageTooLargeError(ClipError):
    code = "image_too_large"


class InvalidImageError(ClipError):
    code = "invalid_image"


class ModelMismatchError(ClipError):
    code = "model_mismatch"


class InternalError(ClipError):
    code = "internal_error"
    retryable = True


class ConfigError(ClipError):
    """A setting is missing or invalid; the message names the variable and a valid value.

    Defined here, not per package, so the worker and the pipeline raise (and catch) one class for the
    one code. Not retryable: the same settings fail the same way until someone changes them.
    """

    code = "config_error"


class NetworkError(ClipError):
    """Could not reach a service (connection refused, DNS, TLS, reset)."""

    code = "network_error"
    retryable = True


class RequestTimeoutError(ClipError):
    """A call got no final answer within its deadline (named so as not to shadow the builtin)."""

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


class ForbiddenError(ClipError):
    """The caller is known but may not do this (a user asking for another user's scenes)."""

    code = "forbidden"


class DatabaseError(ClipError):
    code = "database_error"


class InvalidVideoError(ClipError):
    """The file is not a video we can decode (empty, corrupt, no video stream)."""

    code = "invalid_video"


# Every class above, by its code: the direct subclasses that exist when this module has run, i.e. this
# module's own (subclasses defined elsewhere, such as WeightsUnavailableError, are not rebuilt from a dict).
ERRORS_BY_CODE: dict[str, type[ClipError]] = {cls.code: cls for cls in ClipError.__subclasses__()}


def error_from_dict(data: Mapping[str, Any]) -> ClipError:
    """Rebuild a typed error from its ``to_dict`` form (unknown codes keep their code)."""
    code = str(data.get("code") or "internal_error")
    cls = ERRORS_BY_CODE.get(code, ClipError)
    retryable = data.get("retryable")
    return cls(
        str(data.get("message") or code),
        code=code,
        retryable=bool(retryable) if retryable is not None else None,
    )


def encode_job_error(err: ClipError) -> dict[str, str]:
    """The output a handler returns to fail a whole job: RunPod keeps only ``error``, as a string."""
    return {"error": json.dumps(err.to_dict())}


def parse_remote_error(error: Any) -> ClipError:
    """Read a FAILED job's ``error`` field: ours (JSON text or dict), RunPod's, or plain text."""
    if isinstance(error, str):
        try:
            error = json.loads(error)
        except ValueError:
            return InternalError(f"Worker error: {error[:500]}")
    if isinstance(error, Mapping):
        if "code" in error:
            return error_from_dict(error)
        # An exception that escaped a handler: RunPod reports error_type/error_message (+ traceback,
        # which we drop on purpose).
        if "error_message" in error or "error_type" in error:
            kind = error.get("error_type", "error")
            return InternalError(f"Worker raised {kind}: {str(error.get('error_message', ''))[:500]}")
    return InternalError(f"Worker error: {str(error)[:500]}")
