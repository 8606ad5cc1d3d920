"""Supabase Storage's resumable uploads (TUS 1.0.0) for the embedded storage server.

``POST /upload/resumable`` with ``Upload-Length``, ``Upload-Metadata`` (base64 ``bucketName``,
``objectName``, ``contentType``, ``cacheControl``) and ``x-upsert`` answers 201 with a ``Location``;
``PATCH`` there with ``Upload-Offset`` and ``Content-Type: application/offset+octet-stream`` appends a
chunk, streamed to disk, and answers 204 with the new offset; ``HEAD`` tells the offset (what the server
had read of an interrupted chunk stays, as on the real server); the chunk that reaches ``Upload-Length``
makes the object. Errors are the real status with a plain-text body, as its tus routes answer: 404
"Bucket not found", 413 "Maximum size exceeded", 409 "The resource already exists" (no ``x-upsert``) or
an offset conflict, 412 for another ``Tus-Resumable``, 415 for another ``Content-Type``.

Differences we keep: every chunk but the last must end on a multiple of 6 MiB (``chunk_size``), else
400, where the real server (S3 backend) buffers odd sizes but Supabase documents 6 MiB as the only chunk
size it supports; no creation-with-upload, ``Upload-Defer-Length``, termination, upload expiry or signed
upload URLs; two uploads to one key both proceed (the real one's advisory lock answers the second 409)
and the last to finish wins.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from heimdex_clip_assets.devservices.object_store import (
    CONTROL_CHARS,
    PREFIX,
    ApiError,
    ObjectStore,
    check_object_path,
    now_iso,
    write_atomic,
)

# Resumable (TUS) uploads: the protocol version, the only chunk size Supabase accepts (every chunk but
# the last), and the largest object they take here (the embedded server's; see the module's docstring).
TUS_VERSION = "1.0.0"
TUS_CHUNK_SIZE = 6 * 1024 * 1024
DEFAULT_RESUMABLE_SIZE_LIMIT = 50 * 1024**3
_TUS_LOCK_WAIT_S = 30.0
_TUS_LOCK_POLL_S = 0.02


class TusError(Exception):
    """A TUS answer as the real server gives one: the real HTTP status and a plain-text body (its TUS
    routes answer through the tus server, not the JSON error shape of the REST routes)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def response(self) -> Response:
        return Response(
            self.message,
            status_code=self.status,
            media_type="text/plain",
            headers={"Tus-Resumable": TUS_VERSION},
        )


@dataclass
class _TusUpload:
    bucket: str
    key: str
    length: int
    content_type: str
    cache_control: str
    upsert: bool
    created_at: str
    done: bool = False


def b64url(text: str | bytes) -> str:
    return base64.urlsafe_b64encode(text.encode() if isinstance(text, str) else text).decode().rstrip("=")


def _tus_metadata(header: str) -> dict[str, str]:
    """``Upload-Metadata``: comma-separated ``key base64(value)`` pairs (a key alone means empty)."""
    out: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in header.split(","))):
        name, _, value = pair.partition(" ")
        try:
            out[name] = base64.b64decode(value.strip(), validate=True).decode() if value.strip() else ""
        except (ValueError, UnicodeDecodeError):
            raise TusError(
                400, f"Upload-Metadata value of {name[:64]!r} is not base64 of UTF-8 text"
            ) from None
    return out


def _md5_file(path: Path) -> str:
    md5 = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            md5.update(chunk)
    return md5.hexdigest()


def tus_routes(
    store: ObjectStore,
    is_service: Callable[[Request], bool],
    *,
    size_limit: int,
    chunk_size: int,
) -> list[Route]:
    """``POST /upload/resumable`` creates an upload, ``HEAD .../{id}`` tells its offset, ``PATCH
    .../{id}`` appends a chunk streamed to disk; the last chunk turns the upload into the object."""
    folder = store.root / ".tus"  # bucket names start with a letter or digit: no clash
    folder.mkdir(exist_ok=True)
    base = PREFIX + "/upload/resumable"

    def paths(version: str) -> tuple[Path, Path]:
        return folder / f"{version}.json", folder / f"{version}.part"

    def load(upload_id: str) -> tuple[str, _TusUpload]:
        try:
            decoded = base64.urlsafe_b64decode(upload_id + "=" * (-len(upload_id) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            decoded = ""
        version = decoded.rpartition("/")[2]
        info = paths(version)[0]
        if not re.fullmatch(r"[0-9a-f]{32}", version) or not info.is_file():
            raise TusError(404, "The file for this url was not found")
        return version, _TusUpload(**json.loads(info.read_text()))

    def offset_of(version: str, upload: _TusUpload) -> int:
        if upload.done:
            return upload.length
        try:
            return paths(version)[1].stat().st_size
        except FileNotFoundError:  # its last chunk failed to become the object (a 409, say)
            raise TusError(404, "The file for this url was not found") from None

    def save(version: str, upload: _TusUpload) -> None:
        write_atomic(paths(version)[0], json.dumps(asdict(upload)).encode())

    @asynccontextmanager
    async def locked(version: str) -> AsyncIterator[None]:
        """One request at a time per upload (the real server takes a Postgres advisory lock): a HEAD or
        PATCH arriving while an interrupted PATCH is still being written waits for it to finish. A file
        lock, so it holds across the server's processes (``--workers``)."""
        with (folder / f"{version}.lock").open("a") as handle:
            deadline = time.monotonic() + _TUS_LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TusError(423, "the upload is locked by another request; retry later") from None
                    await asyncio.sleep(_TUS_LOCK_POLL_S)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def check_version(request: Request) -> None:
        if request.headers.get("tus-resumable") != TUS_VERSION:
            raise TusError(412, f"Unsupported TUS version: send Tus-Resumable: {TUS_VERSION}")

    def endpoint(handler: Callable[..., Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                if not is_service(request):
                    raise TusError(403, "new row violates row-level security policy")
                return await handler(request, **request.path_params)
            except TusError as exc:
                return exc.response()
            except ApiError as exc:  # the object store's refusals, in TUS form
                return TusError(exc.status if exc.status < 500 else 500, exc.message).response()

        return run

    async def finish(version: str, upload: _TusUpload) -> None:
        part = paths(version)[1]
        etag = await asyncio.to_thread(_md5_file, part)
        store.place(
            upload.bucket, upload.key, part, upload.content_type, upload.cache_control, upload.upsert,
            etag=etag, size=upload.length,
        )  # fmt: skip
        upload.done = True
        save(version, upload)

    @endpoint
    async def create(request: Request) -> Response:
        check_version(request)
        if request.headers.get("upload-defer-length"):
            raise TusError(400, "Upload-Defer-Length is not supported: send Upload-Length")
        length_header = request.headers.get("upload-length", "")
        if not length_header.isdigit():
            raise TusError(400, "Upload-Length must be the file's size in bytes")
        length = int(length_header)
        meta = _tus_metadata(request.headers.get("upload-metadata", ""))
        bucket, key = meta.get("bucketName", ""), meta.get("objectName", "")
        if not bucket or not key:
            raise TusError(400, "Upload-Metadata must carry bucketName and objectName")
        if request.headers.get("content-length", "0") not in ("", "0"):
            raise TusError(400, "creation-with-upload is not supported here: send the data with PATCH")
        store.bucket(bucket)  # "Bucket not found", 404
        check_object_path(key)
        if length > size_limit:
            raise TusError(413, "Maximum size exceeded")
        content_type = meta.get("contentType") or "application/octet-stream"
        cache_control = meta.get("cacheControl") or "3600"
        if CONTROL_CHARS.search(content_type) or CONTROL_CHARS.search(cache_control):
            raise TusError(400, "contentType and cacheControl must be text without control characters")
        upsert = request.headers.get("x-upsert", "false").lower() == "true"
        store.target(bucket, key)  # a key that cannot be an object here fails now, not at the end
        if not upsert and store.exists(bucket, key):
            raise TusError(409, "The resource already exists")
        version = uuid.uuid4().hex
        upload = _TusUpload(bucket, key, length, content_type, cache_control, upsert, now_iso())
        paths(version)[1].touch()
        save(version, upload)
        if length == 0:
            await finish(version, upload)
        location = f"{str(request.base_url).rstrip('/')}{base}/{b64url(f'{bucket}/{key}/{version}')}"
        return Response(status_code=201, headers={"Location": location, "Tus-Resumable": TUS_VERSION})

    @endpoint
    async def head(request: Request, upload_id: str) -> Response:
        version, _ = load(upload_id)
        async with locked(version):
            upload = load(upload_id)[1]
            offset = offset_of(version, upload)
        headers = {
            "Upload-Offset": str(offset),
            "Upload-Length": str(upload.length),
            "Cache-Control": "no-store",
            "Tus-Resumable": TUS_VERSION,
        }
        return Response(status_code=200, headers=headers)

    @endpoint
    async def patch(request: Request, upload_id: str) -> Response:
        check_version(request)
        if request.headers.get("content-type") != "application/offset+octet-stream":
            raise TusError(415, "Content-Type must be application/offset+octet-stream")
        offset_header = request.headers.get("upload-offset", "")
        if not offset_header.isdigit():
            raise TusError(400, "Upload-Offset must be the byte the chunk starts at")
        offset = int(offset_header)
        version, _ = load(upload_id)
        async with locked(version):
            upload = load(upload_id)[1]
            part = paths(version)[1]
            current = offset_of(version, upload)
            if offset != current:
                raise TusError(409, f"Upload-Offset conflict: the upload is at byte {current}")

            def check_end(end: int) -> None:
                if end > upload.length:
                    raise TusError(413, f"Upload-Length exceeded: the upload is {upload.length} bytes")
                if end != upload.length and end % chunk_size:
                    raise TusError(
                        400,
                        f"each chunk must end on a multiple of {chunk_size} bytes (Supabase takes "
                        f"{chunk_size}-byte chunks) or at the end of the upload; this one ends at {end}",
                    )

            declared = request.headers.get("content-length", "")
            if declared.isdigit():
                check_end(offset + int(declared))  # refused before a byte of the body is read
            if upload.done:  # an empty PATCH at the end of a finished upload: nothing to do
                headers = {"Upload-Offset": str(upload.length), "Tus-Resumable": TUS_VERSION}
                return Response(status_code=204, headers=headers)
            end = offset
            try:
                with part.open("r+b") as out:
                    out.seek(offset)
                    async for piece in request.stream():
                        if end + len(piece) > upload.length:
                            out.truncate(offset)
                            raise TusError(
                                413, f"Upload-Length exceeded: the upload is {upload.length} bytes"
                            )
                        out.write(piece)
                        end += len(piece)
            except ClientDisconnect:
                # As tus servers do, the bytes that arrived stay: a HEAD tells the client where to resume.
                return Response(status_code=400)
            try:
                check_end(end)
            except TusError:
                with part.open("r+b") as out:
                    out.truncate(offset)
                raise
            if end == upload.length:
                await finish(version, upload)
        return Response(status_code=204, headers={"Upload-Offset": str(end), "Tus-Resumable": TUS_VERSION})

    async def options(request: Request) -> Response:
        headers = {
            "Tus-Resumable": TUS_VERSION,
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": "creation",
            "Tus-Max-Size": str(size_limit),
        }
        return Response(status_code=204, headers=headers)

    return [
        Route(base, create, methods=["POST"]),
        Route(base, options, methods=["OPTIONS"]),
        Route(base + "/{upload_id}", head, methods=["HEAD"]),
        Route(base + "/{upload_id}", patch, methods=["PATCH"]),
    ]
