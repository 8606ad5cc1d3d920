"""Object storage: one ``Storage`` interface, implemented on Supabase Storage through supabase-py.

With ``SUPABASE_URL`` unset, ``services.storage`` starts the embedded Supabase-compatible server and
points the same :class:`SupabaseStorage` at it, so tests and local runs exercise the real client code.
Client and HTTP failures become :class:`StorageError` / :class:`NotFoundError` with ``retryable`` set:
server errors and network trouble may pass, bad keys and missing objects will not.

Files over 6 MiB go up as Supabase advises, through its resumable (TUS 1.0.0) endpoint
``/storage/v1/upload/resumable``: one ``POST`` creates the upload, ``PATCH``es send 6 MiB chunks read
from the file (the only chunk size Supabase takes; memory holds a 1 MiB piece at a time), and a chunk
that fails on the network, a timeout or a 5xx resumes from the offset the server reports (``HEAD``)
instead of starting over. storage3 has no resumable upload, so this speaks the protocol with httpx.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar
from urllib.parse import quote, unquote, urljoin, urlsplit

import httpx
from storage3.exceptions import StorageApiError
from supabase import create_client

from heimdex_clip_contract.errors import InvalidRequestError, NotFoundError, StorageError

T = TypeVar("T")
# Supabase's resumable uploads: the protocol version and the one chunk size it accepts (all chunks but
# the last); files over RESUMABLE_THRESHOLD use it, as Supabase advises for anything over 6 MB.
TUS_VERSION = "1.0.0"
TUS_CHUNK_SIZE = 6 * 1024 * 1024
RESUMABLE_THRESHOLD = TUS_CHUNK_SIZE
_PIECE = 1024 * 1024
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


def resumable_endpoint(base_url: str) -> str:
    """Supabase's TUS endpoint for a project URL. A hosted project's ``https://<ref>.supabase.co``
    becomes its direct storage host ``https://<ref>.storage.supabase.co``, which Supabase advises for
    large uploads; any other URL (self-hosted, the embedded server) is used as it is."""
    parts = urlsplit(base_url.rstrip("/"))
    host = parts.hostname or ""
    ref = host.removesuffix(".supabase.co")
    if parts.scheme == "https" and host.endswith(".supabase.co") and ref and "." not in ref:
        parts = parts._replace(netloc=parts.netloc.replace(host, f"{ref}.storage.supabase.co", 1))
    return f"{parts.geturl()}/storage/v1/upload/resumable"


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
    """:class:`Storage` on one Supabase bucket, created (private) if it does not exist.

    Uploads over ``resumable_threshold`` bytes go through TUS in ``chunk_size`` chunks (both Supabase's
    6 MiB; tests pass smaller ones to a server told the same); a chunk may fail ``max_resumes`` times in
    a row before the upload gives up with a retryable :class:`StorageError`.
    """

    def __init__(
        self,
        url: str,
        service_key: str,
        bucket: str,
        *,
        resumable_threshold: int = RESUMABLE_THRESHOLD,
        chunk_size: int = TUS_CHUNK_SIZE,
        max_resumes: int = 5,
    ) -> None:
        self.url = url
        self.bucket = bucket
        self._key = service_key
        self.resumable_threshold = resumable_threshold
        self.chunk_size = chunk_size
        self.max_resumes = max_resumes
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
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        if size > self.resumable_threshold:
            self._call(
                f"upload {path}", lambda: self._upload_resumable(path, data, size, content_type, upsert)
            )
            return
        # content-type is explicit: storage3 would label every object text/plain. Given a path, storage3
        # opens the file and httpx streams it in chunks.
        options = {"content-type": content_type, "upsert": "true" if upsert else "false"}
        self._call(f"upload {path}", lambda: self._files.upload(path, data, options))

    # ---------------------------------------------------------------------------------- TUS uploads
    def _tus_error(self, what: str, reply: httpx.Response) -> StorageError:
        """A TUS answer that is no success, as one of our errors: the real server answers its TUS
        routes with the real status and a plain-text body ("Bucket not found", "Maximum size
        exceeded"); a gateway in front may answer JSON."""
        text = reply.text.strip()
        try:
            body = json.loads(text)
            text = str(body.get("message") or body.get("error") or text) if isinstance(body, dict) else text
        except ValueError:
            pass
        status = reply.status_code
        message = (
            f"{what} failed in bucket {self.bucket!r} at {self.url}: {text[:300] or 'no message'} ({status})"
        )
        if status == 404:
            return NotFoundError(message)
        if status == 413:
            return StorageError(
                f"{message}; raise the file size limit (the bucket's or project's limit on Supabase)"
            )
        if status in (401, 403):
            return StorageError(f"{message}; check SUPABASE_SERVICE_ROLE_KEY")
        return StorageError(message, retryable=status >= 500 or status in (423, 429))

    def _tus_offset(self, client: httpx.Client, location: str, headers: dict[str, str], what: str) -> int:
        """The server's offset for an upload (``HEAD``), asked again on network trouble."""
        for attempt in range(self.max_resumes + 1):
            try:
                reply = client.head(location, headers=headers)
            except httpx.TransportError:
                if attempt == self.max_resumes:
                    raise
                time.sleep(min(0.2 * 2**attempt, 5.0))
                continue
            if reply.status_code != 200 or not reply.headers.get("upload-offset", "").isdigit():
                raise self._tus_error(what, reply)
            return int(reply.headers["upload-offset"])
        raise AssertionError("unreachable")

    def _upload_resumable(
        self, path: str, data: bytes | Path, size: int, content_type: str, upsert: bool
    ) -> None:
        what = f"resumable upload of {path}"
        endpoint = resumable_endpoint(self.url)
        headers = {"Authorization": f"Bearer {self._key}", "apikey": self._key, "Tus-Resumable": TUS_VERSION}
        fields = {
            "bucketName": self.bucket,
            "objectName": path,
            "contentType": content_type,
            "cacheControl": "3600",
        }
        metadata = ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in fields.items())
        timeout = httpx.Timeout(30, read=300)  # the last chunk's answer waits for the object to be stored
        with httpx.Client(timeout=timeout) as client, _open(data) as source:
            created = client.post(
                endpoint,
                headers={
                    **headers,
                    "Upload-Length": str(size),
                    "Upload-Metadata": metadata,
                    "x-upsert": "true" if upsert else "false",
                },
            )
            if created.status_code != 201 or "location" not in created.headers:
                raise self._tus_error(what, created)
            location = urljoin(endpoint, created.headers["location"])
            offset, failures = 0, 0
            while offset < size:
                # Every chunk ends on a chunk boundary (or the file's end): after a resume from an odd
                # offset the next chunk is shorter, and the ones after are whole again.
                end = min(size, (offset // self.chunk_size + 1) * self.chunk_size)
                try:
                    reply = client.patch(
                        location,
                        headers={
                            **headers,
                            "Upload-Offset": str(offset),
                            "Content-Type": "application/offset+octet-stream",
                            "Content-Length": str(end - offset),
                        },
                        content=_read_range(source, offset, end),
                    )
                except httpx.TransportError:
                    reply = None
                if reply is not None and reply.status_code == 204:
                    offset, failures = int(reply.headers.get("upload-offset", end)), 0
                    continue
                # A lost connection, a timeout, a 5xx or an offset conflict (409: the server has more,
                # or less, than we thought): ask where the upload stands and go on from there.
                if reply is not None and reply.status_code != 409 and reply.status_code < 500:
                    raise self._tus_error(what, reply)
                failures += 1
                if failures > self.max_resumes:
                    if reply is not None:
                        raise self._tus_error(what, reply)
                    raise httpx.NetworkError(f"{failures} chunks in a row failed at byte {offset} of {size}")
                time.sleep(min(0.2 * 2 ** (failures - 1), 5.0))
                offset = self._tus_offset(client, location, headers, what)

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


def _open(data: bytes | Path) -> BinaryIO:
    return data.open("rb") if isinstance(data, Path) else io.BytesIO(data)


def _read_range(source: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    """``source``'s bytes ``[start, end)`` in pieces of at most 1 MiB, read as they are sent."""
    source.seek(start)
    left = end - start
    while left > 0:
        piece = source.read(min(_PIECE, left))
        if not piece:
            raise StorageError(
                f"the file ended {left} bytes early while uploading; was it changed meanwhile?"
            )
        left -= len(piece)
        yield piece
