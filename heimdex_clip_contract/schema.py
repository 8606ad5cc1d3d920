"""Job inputs: parsing (worker) and building (client), and the model-version label.

Single image (the guide's v1 shape)::

    {"image_url": str, "request_id": str?, "normalize": bool = true, "model": str?,
     "encoding": "json" | "base64" = "json", "auth": {"ts": int, "sig": hex}}

Batch, several images in one job::

    {"images": [{"image_url": str, "request_id": str?}, ...], "normalize": bool = true,
     "model": str?, "encoding": ..., "auth": {"ts": int, "sig": hex}}

Text, the text tower (search queries, so a search host needs no model of its own)::

    {"texts": [str, ...], "normalize": bool = true, "model": str?, "encoding": ...,
     "auth": {"v": 2, "ts", "nonce", "sig"}}

A text job is signed only as version 2: its canonical form is the whole input, so a text signature can
be neither replayed as an image job nor altered (a query swapped, ``normalize`` flipped) in flight.

``model``, when given, must equal the worker's ``CLIP_MODEL_NAME``; otherwise ``model_mismatch``.
``auth`` is ``{"v": 2, "ts", "nonce", "sig"}`` (the whole request signed, see :mod:`.signing`) or the
guide's ``{"ts", "sig"}`` (version 1, URLs only).

Responses (the job ``output``): single ``{"embedding", "dim", "model", "pretrained", "model_version",
"request_id", "encoding", "timings": {"download_ms", "inference_ms", "total_ms"}}``; batch the same model
fields plus ``results``, one per image in request order, each ``{"request_id", "embedding", "timings"}``
or ``{"request_id", "error": {code, message, retryable}}``; text the same model fields plus
``embeddings``, one per text in request order, and ``timings: {"inference_ms", "total_ms"}``.
"""

from __future__ import annotations

import os.path
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .codec import ENCODINGS, Encoding
from .errors import AuthError, InvalidRequestError
from .signing import (
    LATEST_SIGNATURE_VERSION,
    SIGNATURE_VERSIONS,
    batch_message,
    check_nonce,
    request_message,
    sign_batch,
    sign_request,
    sign_single,
    single_message,
    validate_url_text,
)

MAX_BATCH_ITEMS = 512
MAX_TEXTS = 256
MAX_TEXT_CHARS = 1000  # CLIP reads 77 tokens; longer text is a mistake, not a query


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
    version: int = 1
    nonce: str | None = None
    # The signed text: version 2 covers the whole input, version 1 only the URLs and ts.
    message: str = ""


@dataclass(frozen=True)
class TextRequest:
    """A parsed text job (always signed as version 2)."""

    texts: tuple[str, ...]
    ts: Any
    sig: Any
    nonce: str
    message: str
    normalize: bool = True
    model: str | None = None
    encoding: Encoding = "json"


def is_text_request(job_input: Any) -> bool:
    return isinstance(job_input, Mapping) and "texts" in job_input


def _opt_str(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string")
    return value


def _common(job_input: Mapping[str, Any]) -> tuple[bool, Encoding, str | None]:
    """``normalize``, ``encoding`` and ``model``, checked."""
    normalize = job_input.get("normalize", True)
    if not isinstance(normalize, bool):
        raise InvalidRequestError("normalize must be true or false")
    encoding = job_input.get("encoding", "json")
    if encoding not in ENCODINGS:
        raise InvalidRequestError(f"encoding must be one of {', '.join(ENCODINGS)}")
    return normalize, encoding, _opt_str(job_input.get("model"), "model")


def parse_text_request(job_input: Mapping[str, Any]) -> TextRequest:
    """Validate a text job; raises :class:`InvalidRequestError`, or :class:`AuthError` for its auth."""
    auth = job_input.get("auth")
    if not isinstance(auth, Mapping) or auth.get("v") != LATEST_SIGNATURE_VERSION:
        raise AuthError(
            f"Authentication failed: text jobs are signed as version {LATEST_SIGNATURE_VERSION} "
            '(auth {"v": 2, "ts", "nonce", "sig"}); update the caller'
        )
    texts = job_input.get("texts")
    if not isinstance(texts, list) or not texts:
        raise InvalidRequestError("texts must be a non-empty list of strings")
    if len(texts) > MAX_TEXTS:
        raise InvalidRequestError(f"a text job holds at most {MAX_TEXTS} texts, got {len(texts)}")
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError("each texts[] entry must be a non-empty string")
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidRequestError(f"a text is at most {MAX_TEXT_CHARS} characters, got {len(text)}")
    normalize, encoding, model = _common(job_input)
    return TextRequest(
        texts=tuple(texts),
        ts=auth.get("ts"),
        sig=auth.get("sig"),
        nonce=check_nonce(auth.get("nonce")),
        message=request_message(job_input),
        normalize=normalize,
        model=model,
        encoding=encoding,
    )


def parse_request(job_input: Any) -> EmbedRequest:
    """Validate a job input; raises :class:`InvalidRequestError` (or :class:`AuthError` if no auth)."""
    if not isinstance(job_input, Mapping):
        raise InvalidRequestError("job input must be a JSON object")
    auth = job_input.get("auth")
    if not isinstance(auth, Mapping):
        raise AuthError("Authentication failed: missing auth {ts, sig}")
    version = auth.get("v", 1)
    if isinstance(version, bool) or version not in SIGNATURE_VERSIONS:
        raise AuthError(
            f"Authentication failed: auth.v must be one of {', '.join(map(str, SIGNATURE_VERSIONS))}"
        )
    normalize, encoding, model = _common(job_input)

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
    ts = auth.get("ts")
    if version == 2:
        nonce: str | None = check_nonce(auth.get("nonce"))
        message = request_message(job_input)
    else:
        nonce = None
        urls = [i.image_url for i in items]
        message = batch_message(urls, ts) if batch else single_message(urls[0], ts)
    return EmbedRequest(
        items=tuple(items),
        batch=batch,
        ts=ts,
        sig=auth.get("sig"),
        normalize=normalize,
        model=model,
        encoding=encoding,
        version=version,
        nonce=nonce,
        message=message,
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
    version: int = LATEST_SIGNATURE_VERSION,
) -> dict[str, Any]:
    """The guide's single-image input; ``version=1`` signs it as the guide does (any worker accepts
    that), version 2 signs every field."""
    ts = int(time.time()) if ts is None else ts
    body: dict[str, Any] = {
        "image_url": validate_url_text(image_url),
        "normalize": normalize,
        "encoding": encoding,
    }
    if request_id is not None:
        body["request_id"] = request_id
    if model is not None:
        body["model"] = model
    if version == 1:
        return {**body, "auth": {"ts": ts, "sig": sign_single(image_url, ts, secret)}}
    return sign_request(body, secret, ts=ts)


def build_batch_request(
    items: Iterable[ImageItem],
    secret: str,
    *,
    model: str | None = None,
    normalize: bool = True,
    encoding: Encoding = "base64",
    ts: int | None = None,
    version: int = LATEST_SIGNATURE_VERSION,
) -> dict[str, Any]:
    """A batch input, signed whole (version 2); ``version=1`` is the older URL-only signature."""
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
    }
    if model is not None:
        body["model"] = model
    if version == 1:
        return {**body, "auth": {"ts": ts, "sig": sign_batch(urls, ts, secret)}}
    return sign_request(body, secret, ts=ts)


def build_text_request(
    texts: Iterable[str],
    secret: str,
    *,
    model: str | None = None,
    normalize: bool = True,
    encoding: Encoding = "base64",
    ts: int | None = None,
) -> dict[str, Any]:
    """A text job, signed whole (version 2)."""
    body: dict[str, Any] = {"texts": list(texts), "normalize": normalize, "encoding": encoding}
    if model is not None:
        body["model"] = model
    return sign_request(body, secret, ts=ts)


def weights_are_file(pretrained: str) -> bool:
    """``CLIP_PRETRAINED`` names a weights file rather than an open_clip tag such as ``openai``."""
    return os.path.sep in pretrained or pretrained.endswith((".safetensors", ".pt", ".bin", ".pth"))


def weights_are_random(pretrained: str) -> bool:
    """``CLIP_PRETRAINED=none``: a randomly initialised model, whose vectors and scores mean nothing."""
    return pretrained.strip().lower() == "none"


def derive_model_version(model_name: str, pretrained: str) -> str:
    """A stable label for (architecture, weights), used when ``CLIP_MODEL_VERSION`` is not set.

    ``ViT-B-32`` + ``openai`` gives ``openai-vit-b-32-v1``, the seed's example value. A file path
    uses the file's stem, so the worker and the in-process backend agree when they load one file.
    """

    tag = pretrained
    if weights_are_file(pretrained):
        tag = os.path.splitext(os.path.basename(pretrained))[0]
    return f"{tag}-{model_name}-v1".lower().replace("_", "-")
