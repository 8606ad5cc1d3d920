"""The wire contract between the pipeline's RunPod client and the worker.

Imports only the standard library: the worker, the client and their tests all load this one module,
so a change to the schema or to signing is made once and seen by both sides.

Requests (the ``input`` of a RunPod job)
---------------------------------------
Single image — the seed's v1 shape, accepted forever::

    {"image_url": str, "request_id": str?, "normalize": bool = true, "model": str?,
     "encoding": "json" | "base64" = "json", "auth": {"ts": int, "sig": hex}}

    sig = hex(HMAC-SHA256(secret, f"{image_url}|{ts}"))

Batch — protocol v2, several images in one job::

    {"images": [{"image_url": str, "request_id": str?}, ...], "normalize": bool = true,
     "model": str?, "encoding": ..., "auth": {"ts": int, "sig": hex}}

    sig = hex(HMAC-SHA256(secret, "heimdex-batch-v1|{ts}|" + "\\n".join(image_urls)))

The batch message starts with a fixed tag so a batch signature can never be replayed as a
single-image signature (or the reverse); URLs are joined by newlines, which a valid URL cannot
contain (``validate_url_text`` refuses them), so the joined text is unambiguous and order-sensitive.

``model``, when given, must equal the worker's ``CLIP_MODEL_NAME``; otherwise ``model_mismatch``.

Responses (the job ``output``)
------------------------------
Single: ``{"embedding", "dim", "model", "pretrained", "model_version", "request_id", "encoding",
"timings": {"download_ms", "inference_ms", "total_ms"}}``.
Batch: the same model fields plus ``results``: one entry per image, in request order, each either
``{"request_id", "embedding", "timings"}`` or ``{"request_id", "error": {code, message, retryable}}``.
A failure of the whole job is ``{"error": "<JSON of {code, message, retryable}>"}``, which RunPod
turns into a FAILED job; :func:`parse_remote_error` reads that back, and also RunPod's own shapes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

PROTOCOL_VERSION = 2
BATCH_SIGNING_TAG = "heimdex-batch-v1"
DEFAULT_AUTH_WINDOW_S = 120
MAX_BATCH_ITEMS = 512
MAX_URL_LENGTH = 4096

Encoding = Literal["json", "base64"]
ENCODINGS: tuple[str, ...] = ("json", "base64")


# --------------------------------------------------------------------------------------------- errors
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


ERRORS_BY_CODE: dict[str, type[ClipError]] = {
    cls.code: cls
    for cls in (
        AuthError,
        InvalidRequestError,
        ImageDownloadError,
        ImageTooLargeError,
        InvalidImageError,
        ModelMismatchError,
        InternalError,
        ConfigError,
    )
}


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


# -------------------------------------------------------------------------------------------- signing
# Space and control characters; one C-level scan (a per-character Python loop cost ~10 ms per 512 URLs).
_UNSAFE_URL_CHARS = re.compile(r"[\x00-\x20\x7f]")


def validate_url_text(url: str) -> str:
    """Refuse URLs that would make a signing message ambiguous (control characters, ``|`` is fine)."""
    if not isinstance(url, str) or not url:
        raise InvalidRequestError("image_url must be a non-empty string")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidRequestError(f"image_url is longer than {MAX_URL_LENGTH} characters")
    if _UNSAFE_URL_CHARS.search(url):
        raise InvalidRequestError("image_url contains whitespace or control characters")
    return url


def single_message(image_url: str, ts: int) -> str:
    return f"{image_url}|{ts}"


def batch_message(image_urls: Sequence[str], ts: int) -> str:
    return f"{BATCH_SIGNING_TAG}|{ts}|" + "\n".join(image_urls)


def sign(message: str, secret: str) -> str:
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def sign_single(image_url: str, ts: int, secret: str) -> str:
    return sign(single_message(image_url, ts), secret)


def sign_batch(image_urls: Sequence[str], ts: int, secret: str) -> str:
    return sign(batch_message(image_urls, ts), secret)


class ReplayCache:
    """Signatures seen within the auth window; a second use inside the window is refused.

    Memory is bounded by the request rate times the window: entries expire with the window.
    """

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check_and_add(self, sig: str, expires_at: float, now: float) -> bool:
        """True when ``sig`` is new (and is now remembered), False when it is a replay."""
        with self._lock:
            if len(self._seen) > 1024:
                self._seen = {s: exp for s, exp in self._seen.items() if exp > now}
            exp = self._seen.get(sig)
            if exp is not None and exp > now:
                return False
            self._seen[sig] = expires_at
            return True


@dataclass
class Verifier:
    """Checks request signatures against one or more secrets (several during a rotation)."""

    secrets: Sequence[str]
    window_s: int = DEFAULT_AUTH_WINDOW_S
    replay_cache: ReplayCache = field(default_factory=ReplayCache)

    def verify(self, message: str, ts: Any, sig: Any, *, now: float | None = None) -> None:
        """Raise :class:`AuthError` unless ``sig`` signs ``message`` with a known secret, fresh, unseen.

        The window is two-sided: a timestamp too far in the future is refused like a stale one, so a
        client with a fast clock cannot mint signatures that stay valid for longer than the window.
        """
        now = time.time() if now is None else now
        if not isinstance(sig, str) or not sig:
            raise AuthError("Authentication failed: missing signature (auth.sig)")
        if isinstance(ts, bool) or not isinstance(ts, int):
            raise AuthError("Authentication failed: auth.ts must be an integer Unix timestamp")
        if abs(now - ts) > self.window_s:
            raise AuthError(
                f"Authentication failed: timestamp outside the {self.window_s}s window; check the clocks "
                "of the caller and the worker"
            )
        sig_bytes = sig.lower().encode()
        # Compare against every secret without stopping early, so timing says nothing about which
        # secret (if any) matched.
        matched = False
        for secret in self.secrets:
            expected = sign(message, secret).encode()
            matched |= hmac.compare_digest(expected, sig_bytes)
        if not matched:
            raise AuthError(
                "Authentication failed: bad signature; EMBEDDING_HMAC_SECRET must be identical on the "
                "caller and the worker"
            )
        if not self.replay_cache.check_and_add(sig.lower(), ts + self.window_s, now):
            raise AuthError("Authentication failed: this signature was already used (replay)")


# -------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class ImageItem:
    image_url: str
    request_id: str | None = None


@dataclass(frozen=True)
class EmbedRequest:
    """A parsed job input: one image (``batch=False``) or several."""

    items: tuple[ImageItem, ...]
    batch: bool
    ts: Any
    sig: Any
    normalize: bool = True
    model: str | None = None
    encoding: Encoding = "json"

    @property
    def message(self) -> str:
        if self.batch:
            return batch_message([i.image_url for i in self.items], self.ts)
        return single_message(self.items[0].image_url, self.ts)


def _opt_str(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string")
    return value


def parse_request(job_input: Any) -> EmbedRequest:
    """Validate a job input; raises :class:`InvalidRequestError` (or :class:`AuthError` if no auth)."""
    if not isinstance(job_input, Mapping):
        raise InvalidRequestError("job input must be a JSON object")
    auth = job_input.get("auth")
    if not isinstance(auth, Mapping):
        raise AuthError("Authentication failed: missing auth {ts, sig}")
    normalize = job_input.get("normalize", True)
    if not isinstance(normalize, bool):
        raise InvalidRequestError("normalize must be true or false")
    encoding = job_input.get("encoding", "json")
    if encoding not in ENCODINGS:
        raise InvalidRequestError(f"encoding must be one of {', '.join(ENCODINGS)}")
    model = _opt_str(job_input.get("model"), "model")

    if "images" in job_input:
        if "image_url" in job_input:
            raise InvalidRequestError("send either image_url or images, not both")
        raw = job_input["images"]
        if not isinstance(raw, list) or not raw:
            raise InvalidRequestError("images must be a non-empty list")
        if len(raw) > MAX_BATCH_ITEMS:
            raise InvalidRequestError(f"a batch holds at most {MAX_BATCH_ITEMS} images, got {len(raw)}")
        items = []
        for entry in raw:
            if not isinstance(entry, Mapping):
                raise InvalidRequestError("each images[] entry must be an object with image_url")
            items.append(
                ImageItem(
                    validate_url_text(entry.get("image_url")),
                    _opt_str(entry.get("request_id"), "request_id"),
                )
            )
        batch = True
    else:
        items = [
            ImageItem(
                validate_url_text(job_input.get("image_url")),
                _opt_str(job_input.get("request_id"), "request_id"),
            )
        ]
        batch = False
    return EmbedRequest(
        items=tuple(items),
        batch=batch,
        ts=auth.get("ts"),
        sig=auth.get("sig"),
        normalize=normalize,
        model=model,
        encoding=encoding,
    )


def build_single_request(
    image_url: str,
    secret: str,
    *,
    request_id: str | None = None,
    model: str | None = None,
    normalize: bool = True,
    encoding: Encoding = "json",
    ts: int | None = None,
) -> dict[str, Any]:
    ts = int(time.time()) if ts is None else ts
    body: dict[str, Any] = {
        "image_url": validate_url_text(image_url),
        "normalize": normalize,
        "encoding": encoding,
        "auth": {"ts": ts, "sig": sign_single(image_url, ts, secret)},
    }
    if request_id is not None:
        body["request_id"] = request_id
    if model is not None:
        body["model"] = model
    return body


def build_batch_request(
    items: Iterable[ImageItem],
    secret: str,
    *,
    model: str | None = None,
    normalize: bool = True,
    encoding: Encoding = "base64",
    ts: int | None = None,
) -> dict[str, Any]:
    items = list(items)
    ts = int(time.time()) if ts is None else ts
    urls = [validate_url_text(i.image_url) for i in items]
    body: dict[str, Any] = {
        "images": [
            {"image_url": i.image_url, **({"request_id": i.request_id} if i.request_id else {})}
            for i in items
        ],
        "normalize": normalize,
        "encoding": encoding,
        "auth": {"ts": ts, "sig": sign_batch(urls, ts, secret)},
    }
    if model is not None:
        body["model"] = model
    return body


# ------------------------------------------------------------------------------------- embeddings
def encode_embedding(values: Sequence[float] | Any, encoding: Encoding) -> list[float] | str:
    """JSON floats (the seed's shape) or base64 little-endian float32 (4 bytes, not ~20, per value).

    A numpy array (duck-typed, so this module still imports only the standard library) is converted
    in C: a Python loop over 512 floats costs ~0.1 ms per embedding, ~50 ms for a 512-image batch.
    """
    if hasattr(values, "astype") and hasattr(values, "tobytes"):
        if encoding == "base64":
            return base64.b64encode(values.astype("<f4", copy=False).tobytes()).decode()
        # tolist() of float32 gives the same Python floats as float(v) per element, ~3x faster.
        return values.tolist()
    if encoding == "base64":
        import array

        arr = array.array("f", (float(v) for v in values))
        if arr.itemsize != 4:  # pragma: no cover - every platform we run on has 4-byte floats
            raise InternalError("float32 array has an unexpected item size")
        return base64.b64encode(arr.tobytes()).decode()
    return [float(v) for v in values]


def decode_embedding(value: Any, dim: int | None = None) -> list[float]:
    if isinstance(value, str):
        import array

        arr = array.array("f")
        try:
            arr.frombytes(base64.b64decode(value, validate=True))
        except ValueError as exc:
            raise InvalidRequestError("embedding is not valid base64 float32") from exc
        out = arr.tolist()
    elif isinstance(value, list):
        out = [float(v) for v in value]
    else:
        raise InvalidRequestError("embedding is missing or has the wrong type")
    if dim is not None and len(out) != dim:
        raise ModelMismatchError(f"Unexpected embedding dimension: {len(out)} (expected {dim})")
    if not all(math.isfinite(v) for v in out):
        raise InvalidImageError("embedding holds NaN or infinite values")
    return out


# ------------------------------------------------------------------------------------ model version
def derive_model_version(model_name: str, pretrained: str) -> str:
    """A stable label for (architecture, weights), used when ``CLIP_MODEL_VERSION`` is not set.

    ``ViT-B-32`` + ``openai`` gives ``openai-vit-b-32-v1``, the seed's example value. A file path
    uses the file's stem, so the worker and the in-process backend agree when they load one file.
    """
    import os.path

    tag = pretrained
    if os.path.sep in pretrained or pretrained.endswith((".safetensors", ".pt", ".bin", ".pth")):
        tag = os.path.splitext(os.path.basename(pretrained))[0]
    return f"{tag}-{model_name}-v1".lower().replace("_", "-")
