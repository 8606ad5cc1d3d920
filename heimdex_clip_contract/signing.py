"""Request signing: ``hex(HMAC-SHA256(secret, message))`` with a two-sided time window.

Single image (the guide's shape, accepted forever): ``message = f"{image_url}|{ts}"``.
Batch: ``message = "heimdex-batch-v1|{ts}|" + "\\n".join(image_urls)``. The fixed tag keeps a batch
signature from being replayed as a single-image one (or the reverse); URLs are joined by newlines,
which :func:`validate_url_text` refuses inside a URL, so the joined text is unambiguous.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import AuthError, InvalidRequestError

BATCH_SIGNING_TAG = "heimdex-batch-v1"
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
