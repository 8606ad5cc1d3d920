"""Request signing: ``hex(HMAC-SHA256(secret, message))`` with a two-sided time window.

Version 2 (``auth = {"v": 2, "ts", "nonce", "sig"}``, what our client sends) signs the WHOLE request:
``message = "heimdex-request-v2\\n" + canonical JSON of the job input with ``auth.sig`` left out``.
Canonical JSON is ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True)``: keys sorted
by code point, no whitespace, non-ASCII as ``\\uXXXX``. Every field (``normalize``, ``model``,
``request_id``, ``encoding``, each image, fields added later such as a text job's) is covered, so none
can be changed in flight. Values are strings, integers within +-(2**53 - 1), booleans, null, lists and
objects; floats are refused, since languages print them differently.

Version 1 (``auth = {"ts", "sig"}``, no ``v``) signs only the URLs and is accepted for compatibility:
- single image, the guide's format: ``message = f"{image_url}|{ts}"``;
- batch: ``message = "heimdex-batch-v1|{ts}|" + "\\n".join(image_urls)``.
A worker with ``AUTH_MIN_SIGNATURE_VERSION=2`` refuses them once every caller sends version 2.

Replay: a worker remembers each nonce (version 1: each signature) until its timestamp leaves the window,
and refuses a second use. The memory is per worker process: a request captured in flight could be
replayed once to each other worker within ``AUTH_TIME_WINDOW_SECONDS`` (120 s by default), which bounds
it. RunPod's workers share no store, and the job's submitter must already hold the RunPod API key, so we
keep that bound rather than add a shared store.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets as _secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import AuthError, InvalidRequestError

BATCH_SIGNING_TAG = "heimdex-batch-v1"
REQUEST_SIGNING_TAG = "heimdex-request-v2"
SIGNATURE_VERSIONS = (1, 2)
LATEST_SIGNATURE_VERSION = 2
MAX_SAFE_INT = 2**53 - 1
# Timestamps are Unix seconds; anything past this (year 5138) is garbage, and refusing it before the
# window arithmetic keeps a huge integer from overflowing float conversion.
MAX_TIMESTAMP = 10**11
_NONCE = re.compile(r"[0-9a-f]{32,128}")
DEFAULT_AUTH_WINDOW_S = 120
MAX_URL_LENGTH = 4096

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


def _check_canonical(value: Any, where: str) -> None:
    """Refuse what canonical JSON cannot pin down across languages: floats, huge integers, odd keys."""
    if value is None or isinstance(value, str | bool):
        return
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INT:
            raise InvalidRequestError(f"{where} is outside the integer range +-(2**53 - 1)")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidRequestError(f"{where} has a key that is not a string")
            _check_canonical(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_canonical(item, f"{where}[{i}]")
    else:
        raise InvalidRequestError(
            f"{where} is a {type(value).__name__}; a signed request holds strings, integers, booleans, "
            "null, lists and objects"
        )


def request_message(job_input: Mapping[str, Any]) -> str:
    """The version-2 message: the tag, a newline, the canonical JSON of the input without ``auth.sig``."""
    auth = job_input.get("auth")
    if not isinstance(auth, Mapping):
        raise InvalidRequestError("auth must be an object")
    body = {**job_input, "auth": {k: v for k, v in auth.items() if k != "sig"}}
    _check_canonical(body, "input")
    return (
        REQUEST_SIGNING_TAG
        + "\n"
        + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    )


def sign_request(
    job_input: Mapping[str, Any], secret: str, *, ts: int | None = None, nonce: str | None = None
) -> dict[str, Any]:
    """``job_input`` with a version-2 ``auth`` block: a fresh nonce, ``ts`` (now) and the signature."""
    auth = {
        "v": 2,
        "ts": int(time.time()) if ts is None else ts,
        "nonce": nonce or _secrets.token_hex(16),
    }
    unsigned = {**job_input, "auth": auth}
    return {**unsigned, "auth": {**auth, "sig": sign(request_message(unsigned), secret)}}


def check_nonce(nonce: Any) -> str:
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise AuthError("Authentication failed: auth.nonce must be 32 to 128 lowercase hex characters")
    return nonce


def sign(message: str, secret: str) -> str:
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def sign_single(image_url: str, ts: int, secret: str) -> str:
    return sign(single_message(image_url, ts), secret)


def sign_batch(image_urls: Sequence[str], ts: int, secret: str) -> str:
    return sign(batch_message(image_urls, ts), secret)


class ReplayCache:
    """Nonces (version 1: signatures) seen within the auth window; a second use inside it is refused.

    Memory is bounded by the request rate times the window: entries expire with the window.
    """

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check_and_add(self, key: str, expires_at: float, now: float) -> bool:
        """True when ``key`` is new (and is now remembered), False when it is a replay."""
        with self._lock:
            if len(self._seen) > 1024:
                self._seen = {s: exp for s, exp in self._seen.items() if exp > now}
            exp = self._seen.get(key)
            if exp is not None and exp > now:
                return False
            self._seen[key] = expires_at
            return True


@dataclass
class Verifier:
    """Checks request signatures against one or more secrets (several during a rotation)."""

    secrets: Sequence[str]
    window_s: int = DEFAULT_AUTH_WINDOW_S
    min_version: int = 1
    replay_cache: ReplayCache = field(default_factory=ReplayCache)

    def verify(
        self,
        message: str,
        ts: Any,
        sig: Any,
        *,
        version: int = 1,
        nonce: str | None = None,
        now: float | None = None,
    ) -> None:
        """Raise :class:`AuthError` unless ``sig`` signs ``message`` with a known secret, fresh, unseen.

        The window is two-sided: a timestamp too far in the future is refused like a stale one, so a
        client with a fast clock cannot mint signatures that stay valid for longer than the window.
        ``nonce`` (version 2) is the replay key; version 1 has none, so its signature is.
        """
        now = time.time() if now is None else now
        if version < self.min_version:
            raise AuthError(
                f"Authentication failed: this worker accepts signature version {self.min_version} or "
                f"later (AUTH_MIN_SIGNATURE_VERSION), got {version}; update the caller"
            )
        if not isinstance(sig, str) or not sig:
            raise AuthError("Authentication failed: missing signature (auth.sig)")
        if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= MAX_TIMESTAMP:
            raise AuthError("Authentication failed: auth.ts must be an integer Unix timestamp in seconds")
        if abs(int(now) - ts) > self.window_s:
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
        if not self.replay_cache.check_and_add(nonce or sig.lower(), ts + self.window_s, now):
            raise AuthError("Authentication failed: this request was already used (replay)")
