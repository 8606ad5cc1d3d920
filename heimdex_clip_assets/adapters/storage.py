"""Object storage: one ``Storage`` interface, implemented on Supabase Storage through supabase-py.

With ``SUPABASE_URL`` unset, ``services.storage`` starts the embedded Supabase-compatible server and
points the same :class:`SupabaseStorage` at it, so tests and local runs exercise the real client code.
Client and HTTP failures become :class:`StorageError` / :class:`NotFoundError` with ``retryable`` set:
server errors and network trouble may pass, bad keys and missing objects will not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import quote, unquote, urlsplit

import httpx
from storage3.exceptions import StorageApiError
from supabase import create_client

from heimdex_clip_contract.errors import InvalidRequestError, NotFoundError, StorageError

T = TypeVar("T")
# The seed system stores each thumbnail's URL in this public form, whatever the bucket's privacy, and
# its own backfill turns it back into the object's path by splitting on this marker.
PUBLIC_MARKER = "/storage/v1/object/public/"


def public_url(base_url: str, bucket: str, path: str) -> str:
    """``{SUPABASE_URL}/storage/v1/object/public/{bucket}/{path}``: the seed's ``thumbnail_url`` form."""
    return f"{base_url.rstrip('/')}{PUBLIC_MARKER}{bucket}/{quote(path)}"


def object_path(url: str, bucket: str) -> str:
    """The path in ``bucket`` that a public-form URL names (the host is ignored: a project's URL may
    have changed since the row was written)."""
    parts = urlsplit(url)
    marker = f"{PUBLIC_MARKER}{bucket}/"
    _, found, path = parts.path.partition(marker)
    if parts.scheme not in ("http", "https") or not found or not path.strip("/"):
        raise InvalidRequestError(
            f"thumbnail_url {url[:200]!r} is not a storage URL of bucket {bucket!r} "
            f"(https://<project>{marker}<path>); correct it, or set it to NULL to skip the scene"
        )
    return unquote(path)


class Storage(Protocol):
    bucket: str

    def upload(
        self, path: str, data: bytes | Path, content_type: str = "image/jpeg", upsert: bool = True
    ) -> None:
        """``data`` as bytes, or a local file streamed from disk (videos)."""
        ...

    def download(self, path: str) -> bytes: ...

    def download_to(self, path: str, dest: Path) -> None:
        """Stream an object into a local file: memory stays flat whatever the object's size."""
        ...

    def create_signed_url(self, path: str, expires_in: int = 300) -> str:
        """An absolute URL anyone can GET without credentials until it expires."""
        ...

    def create_signed_urls(
        self, paths: Sequence[str], expires_in: int = 300, *, missing_ok: bool = False
    ) -> dict[str, str]:
        """One URL per path; a missing object raises :class:`NotFoundError`, or with ``missing_ok`` is
        left out of the result."""
        ...

    def exists(self, path: str) -> bool: ...

    def remove(self, paths: Sequence[str]) -> None: ...

    def public_url(self, path: str) -> str:
        """The object's URL in the seed's ``thumbnail_url`` form (see :func:`public_url`)."""
        ...

    def object_path(self, url: str) -> str:
        """The path of this bucket's object that a ``thumbnail_url`` names (see :func:`object_path`)."""
        ...


class SupabaseStorage:
    """:class:`Storage` on one Supabase bucket, created (private) if it does not exist."""

    def __init__(self, url: str, service_key: str, bucket: str) -> None:
        self.url = url
        self.bucket = bucket
        self._key = service_key
        self._storage = create_client(url, service_key).storage
        self._files = self._storage.from_(bucket)
        self._ensure_bucket()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except StorageApiError as exc:
            status = int(exc.status) if str(exc.status).isdigit() else 500
            message = f"{what} failed in bucket {self.bucket!r} at {self.url}: {exc.message} ({exc.code})"
            if status == 404:
                raise NotFoundError(message) from exc
            if status == 413:
                raise StorageError(
                    f"{message}; raise the file size limit (HEIMDEX_STORAGE_FILE_SIZE_LIMIT for the embedded "
                    "server, the bucket's or project's limit on Supabase)"
                ) from exc
            if status in (401, 403) or exc.code in ("Unauthorized", "InvalidJWT"):
                raise StorageError(f"{message}; check SUPABASE_SERVICE_ROLE_KEY") from exc
            raise StorageError(message, retryable=status >= 500 or status == 429) from exc
        except httpx.TimeoutException as exc:
            raise StorageError(f"{what} timed out at {self.url}", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise StorageError(
                f"{what}: cannot reach storage at {self.url} ({exc}); check SUPABASE_URL", retryable=True
            ) from exc
        except ValueError as exc:  # storage3 refuses dot segments ("../") in keys before sending
            raise StorageError(f"{what}: {exc}") from exc

    def _ensure_bucket(self) -> None:
        try:
            self._call("get bucket", lambda: self._storage.get_bucket(self.bucket))
        except NotFoundError:
            try:
                self._call(
                    "create bucket",
                    lambda: self._storage.create_bucket(self.bucket, options={"public": False}),
                )
            except StorageError as exc:
                if "Duplicate" not in exc.message:  # another process created it meanwhile
                    raise

    def upload(
        self, path: str, data: bytes | Path, content_type: str = "image/jpeg", upsert: bool = True
    ) -> None:
        # content-type is explicit: storage3 would label every object text/plain. Given a path, storage3
        # opens the file and httpx streams it in chunks.
        options = {"content-type": content_type, "upsert": "true" if upsert else "false"}
        self._call(f"upload {path}", lambda: self._files.upload(path, data, options))

    def download(self, path: str) -> bytes:
        return self._call(f"download {path}", lambda: self._files.download(path))

    def download_to(self, path: str, dest: Path) -> None:
        url = f"{self.url}/storage/v1/object/{self.bucket}/{quote(path)}"
        headers = {"Authorization": f"Bearer {self._key}", "apikey": self._key}

        def fetch() -> None:
            with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(30, read=300)) as reply:
                if reply.status_code != 200:  # Supabase's error body, as storage3 reads it
                    body = json.loads(reply.read() or b"{}")
                    raise StorageApiError(
                        str(body.get("message", "")), str(body.get("error", "")), body.get("statusCode", 500)
                    )
                with dest.open("wb") as fh:
                    for chunk in reply.iter_bytes(1 << 20):
                        fh.write(chunk)

        self._call(f"download {path}", fetch)

    def create_signed_url(self, path: str, expires_in: int = 300) -> str:
        reply = self._call(f"sign {path}", lambda: self._files.create_signed_url(path, expires_in))
        return str(reply["signedURL"])

    def create_signed_urls(
        self, paths: Sequence[str], expires_in: int = 300, *, missing_ok: bool = False
    ) -> dict[str, str]:
        """One request for many URLs; raises :class:`NotFoundError` naming any path that is missing, or
        with ``missing_ok`` leaves those paths out (a search result whose thumbnail is gone)."""
        if not paths:
            return {}
        replies = self._call(
            f"sign {len(paths)} paths", lambda: self._files.create_signed_urls(list(paths), expires_in)
        )
        missing = [r["path"] for r in replies if not r["signedURL"]]
        if missing and missing_ok:
            return {str(r["path"]): str(r["signedURL"]) for r in replies if r["signedURL"]}
        if missing:
            raise NotFoundError(
                f"cannot sign {len(missing)} missing objects in bucket {self.bucket!r}: {missing[:5]}"
            )
        return {str(r["path"]): str(r["signedURL"]) for r in replies if r["signedURL"]}

    def public_url(self, path: str) -> str:
        return public_url(self.url, self.bucket, path)

    def object_path(self, url: str) -> str:
        return object_path(url, self.bucket)

    def exists(self, path: str) -> bool:
        return self._call(f"check {path}", lambda: self._files.exists(path))

    def remove(self, paths: Sequence[str]) -> None:
        """Delete objects; paths that do not exist are skipped, as Supabase does."""
        if paths:
            self._call(f"remove {len(paths)} objects", lambda: self._files.remove(list(paths)))
