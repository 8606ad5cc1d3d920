"""An embedded, Supabase-compatible storage server: objects on disk, served over HTTP on 127.0.0.1.

No Supabase server can run here, so with ``SUPABASE_URL`` unset this stands in for it, speaking the
subset of Supabase Storage's REST API that supabase-py's storage3 uses. The pipeline therefore runs the
one ``SupabaseStorage`` code path in both cases, and the worker fetches signed URLs from it as it would
from Supabase. It runs as a detached process shared by every pipeline process
(:func:`ensure_storage_server`), or as a command::

    python -m heimdex_clip_assets.devservices.storage_server --root DIR --port 8787

It answers as the real server does (measured against Supabase Storage's own source, see
``shared/notes/heimdex-system-facts.md``), where our client or tests could otherwise pass on behaviour
the real one lacks:
- every error is HTTP 400 (500 for our own failures) with the status in the JSON body as a string,
  ``{"statusCode": "404", "code": "NoSuchKey", "error": "not_found", "message": "Object not found"}``,
  with the real ``code``s (NoSuchKey, NoSuchBucket, KeyAlreadyExists, BucketAlreadyExists, InvalidKey,
  InvalidJWT, InvalidSignature, InvalidRequest, EntityTooLarge, AccessDenied);
- the service key is an HS256 JWT ``{"role": "service_role"}`` signed with the server's secret; only
  ``Authorization: Bearer`` counts (``apikey`` is the gateway's business and is ignored), and a missing
  or invalid token is the anonymous role, which sees no bucket ("Bucket not found");
- signed URLs carry an HS256 JWT bound to one object and an expiry, with the real messages;
- standard uploads are capped at Supabase's default file size limit (50 MiB; ``file_size_limit``) and
  streamed to disk, never held in memory; bodies that are not JSON objects, fields of the wrong type and
  ``cacheControl`` with control characters are 400 ``InvalidRequest``;
- resumable uploads speak TUS 1.0.0 at ``/upload/resumable`` as Supabase's does: ``POST`` with
  ``Upload-Length``, ``Upload-Metadata`` (base64 ``bucketName``, ``objectName``, ``contentType``,
  ``cacheControl``) and ``x-upsert`` answers 201 with a ``Location``; ``PATCH`` there with
  ``Upload-Offset`` and ``Content-Type: application/offset+octet-stream`` appends a chunk, streamed to
  disk, and answers 204 with the new offset; ``HEAD`` tells the offset (what the server had read of an
  interrupted chunk stays, as on the real server); the chunk that reaches ``Upload-Length`` makes the
  object. Errors are the real status with a plain-text body, as its tus routes answer: 404 "Bucket not
  found", 413 "Maximum size exceeded", 409 "The resource already exists" (no ``x-upsert``) or an offset
  conflict, 412 for another ``Tus-Resumable``, 415 for another ``Content-Type``.

Differences we keep, each a refusal where the real server would store: keys are files, so a key with
an empty segment (``a//b``), a segment over 200 bytes, or one that would make an object a folder (``a``
and ``a/b``) is 400 ``InvalidKey``; the anonymous role sees no bucket at all (row-level policies are
not modelled); there is no public-object route or image transformation. For TUS: every chunk but
the last must end on a multiple of 6 MiB (``tus_chunk_size``), else 400, where the real server (S3
backend) buffers odd sizes but Supabase documents 6 MiB as the only chunk size it supports; standard
uploads stop at ``file_size_limit`` (50 MiB) while TUS takes up to ``resumable_size_limit`` (50 GiB),
where the real server applies one limit to both (its global or the bucket's ``file_size_limit``), so a
large video can only come in the way Supabase advises for anything over 6 MB; no creation-with-upload,
``Upload-Defer-Length``, termination, upload expiry or signed upload URLs; two uploads to one key both
proceed (the real one's advisory lock answers the second 409) and the last to finish wins.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path
from typing import IO, Any

import jwt
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive

from heimdex_clip_assets.devservices.net import NotReadyError, answers, port_file_url, wait_until
from heimdex_clip_assets.devservices.postgres import private_dir
from heimdex_clip_contract.errors import StorageError

PREFIX = "/storage/v1"
JWT_SECRET_ENV = "HEIMDEX_STORAGE_JWT_SECRET"
# Supabase's default global file size limit (its FILE_SIZE_LIMIT), in bytes.
DEFAULT_FILE_SIZE_LIMIT = 50 * 1024 * 1024
# Resumable (TUS) uploads: the protocol version, the only chunk size Supabase accepts (every chunk but
# the last), and the largest object they take here (the embedded server's; see the module's docstring).
TUS_VERSION = "1.0.0"
TUS_CHUNK_SIZE = 6 * 1024 * 1024
DEFAULT_RESUMABLE_SIZE_LIMIT = 50 * 1024**3
_TUS_LOCK_WAIT_S = 30.0
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# A key segment is a file name (plus ".json" for its metadata, and a temp-name prefix and suffix of 38):
# 200 bytes keeps every one under the usual 255-byte NAME_MAX. 1024 bytes is S3's (and Supabase's) key limit.
_MAX_SEGMENT_BYTES = 200
_MAX_KEY_BYTES = 1024
_FOLDER_VERDICTS = 10_000  # folders whose "inside the bucket" verdict is kept
_INLINE_BYTES = 1024 * 1024  # objects up to this size are served from one read, not streamed
# Room for the multipart framing and the cacheControl field around the file's own bytes.
_MULTIPART_SLACK = 64 * 1024
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_START_TIMEOUT_S = 20.0
_NO_OBJECT = "Either the object does not exist or you do not have access to it"  # Supabase's wording


class ApiError(Exception):
    """An error answered as Supabase answers: HTTP 400 (500 for our own failures) and the real status in
    the body, ``{"statusCode", "code", "error", "message"}``; ``error`` is the older field storage3 reads
    as the code, so it keeps the real server's values ("not_found", "Duplicate", ...)."""

    def __init__(self, status: int, code: str, message: str, *, error: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.error = status, code, message, error or code

    def response(self) -> JSONResponse:
        body = {
            "statusCode": str(self.status),
            "code": self.code,
            "error": self.error,
            "message": self.message,
        }
        return JSONResponse(body, status_code=500 if self.status >= 500 else 400)


def _no_object() -> ApiError:
    # storage3's exists() reads error "not_found" with statusCode 404 as "no such object".
    return ApiError(404, "NoSuchKey", "Object not found", error="not_found")


def _no_bucket() -> ApiError:
    return ApiError(404, "NoSuchBucket", "Bucket not found", error="Bucket not found")


def _duplicate(code: str) -> ApiError:
    return ApiError(409, code, "The resource already exists", error="Duplicate")


def _invalid_key(key: str, why: str = "") -> ApiError:
    return ApiError(400, "InvalidKey", f"Invalid key: {key}{why}")


def _invalid_request(message: str) -> ApiError:
    return ApiError(400, "InvalidRequest", message)


def _too_large() -> ApiError:
    return ApiError(
        413, "EntityTooLarge", "The object exceeded the maximum allowed size", error="Payload too large"
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + os.sep)


def check_object_path(path: str) -> str:
    """Refuse keys that could name something outside the bucket or that no file can hold, before any
    filesystem call."""
    segments = path.split("/")
    if (
        not path
        or "\\" in path
        or "\x00" in path
        or path.startswith("/")
        or any(seg in ("", ".", "..") for seg in segments)
    ):
        raise _invalid_key(path)
    if len(path.encode()) > _MAX_KEY_BYTES:
        raise _invalid_key(path[:64] + "...", f" (longer than {_MAX_KEY_BYTES} bytes)")
    if any(len(seg.encode()) > _MAX_SEGMENT_BYTES for seg in segments):
        raise _invalid_key(
            path, f" (a path segment over {_MAX_SEGMENT_BYTES} bytes, the embedded server's limit)"
        )
    return path


class ObjectStore:
    """Buckets as folders: ``ROOT/<bucket>/objects/<key>`` holds the bytes and ``.../meta/<key>.json``
    the content type, MD5 and timestamps, so object keys can never collide with metadata."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._tops: dict[str, str] = {}  # a bucket's objects or meta folder, resolved once
        self._folders: dict[str, bool] = {}  # folder -> whether it resolves inside its top
        self._buckets: dict[str, tuple[int, dict[str, Any]]] = {}  # bucket -> (file mtime, info)

    def _bucket_dir(self, bucket: str) -> Path:
        if not _BUCKET_RE.fullmatch(bucket):
            raise ApiError(400, "InvalidBucketName", "Bucket name invalid")
        return self.root / bucket

    def bucket(self, bucket: str) -> dict[str, Any]:
        """The bucket's info; read again only when its file changed (every request checks its bucket)."""
        info = self._bucket_dir(bucket) / "bucket.json"
        try:
            stamp = info.stat().st_mtime_ns
        except FileNotFoundError:
            raise _no_bucket() from None
        known = self._buckets.get(bucket)
        if known is None or known[0] != stamp:
            known = self._buckets[bucket] = stamp, json.loads(info.read_text())
        return known[1]

    def buckets(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.root.glob("*/bucket.json"))]

    def create_bucket(self, bucket: str, public: bool) -> None:
        folder = self._bucket_dir(bucket)
        now = _now()
        info = {
            "id": bucket,
            "name": bucket,
            "owner": "",
            "public": public,
            "file_size_limit": None,
            "allowed_mime_types": None,
            "created_at": now,
            "updated_at": now,
        }
        try:
            folder.mkdir()  # atomic: of two concurrent creators exactly one wins
        except FileExistsError:
            raise _duplicate("BucketAlreadyExists") from None
        _write_atomic(folder / "bucket.json", json.dumps(info).encode())

    def _paths(self, bucket: str, key: str, *, bucket_checked: bool = False) -> tuple[Path, Path]:
        if not bucket_checked:
            self.bucket(bucket)
        data, meta = self._locate(bucket, key)
        return Path(data), Path(meta)

    def _locate(self, bucket: str, key: str) -> tuple[str, str]:
        """``key``'s data and metadata files, as strings: pathlib's parsing was most of the cost of
        signing a job's few hundred thumbnails."""
        base = str(self._bucket_dir(bucket))
        check_object_path(key)
        data, meta = f"{base}/objects/{key}", f"{base}/meta/{key}.json"
        # Belt and braces after check_object_path: symlinks planted on disk still cannot lead out.
        for path, top in ((data, f"{base}/objects"), (meta, f"{base}/meta")):
            if not self._inside(path, top):
                raise _invalid_key(key)
        return data, meta

    def _inside(self, path: str, top: str) -> bool:
        """Whether ``path``, symlinks followed, stays under ``top`` as first resolved (a symlink planted
        there later is refused all the same). A folder's verdict is kept while it exists (a job's
        thumbnails share a few): only a hand with write access to the root, which could write the
        objects themselves, could swap one for a symlink."""
        resolved_top = self._tops.get(top)
        if resolved_top is None:
            resolved_top = self._tops[top] = os.path.realpath(top)
        folder = os.path.dirname(path)
        inside = self._folders.get(folder)
        if inside is None:
            inside = _under(os.path.realpath(folder), resolved_top)
            if os.path.isdir(folder):
                if len(self._folders) >= _FOLDER_VERDICTS:
                    self._folders.clear()
                self._folders[folder] = inside
        return inside and (not os.path.islink(path) or _under(os.path.realpath(path), resolved_top))

    def signable(self, bucket: str, keys: list[str]) -> list[bool]:
        """Whether each key is an object of ``bucket`` (checked once), without reading its metadata:
        signing a job's few hundred thumbnails is one call."""
        self.bucket(bucket)
        return [all(os.path.isfile(path) for path in self._locate(bucket, key)) for key in keys]

    def _target(self, bucket: str, key: str) -> tuple[Path, Path]:
        """Where ``key``'s bytes and metadata go, refusing keys that cannot be files here (an object
        cannot also be a folder on disk: "a" then "a/b", or the reverse)."""
        data, meta = self._paths(bucket, key)
        objects = self._bucket_dir(bucket) / "objects"
        for parent in data.relative_to(objects).parents:
            if parent != Path(".") and (objects / parent).is_file():
                raise _invalid_key(key, f" ('{parent}' is an object, so it cannot also be a folder here)")
        if data.is_dir():
            raise _invalid_key(key, " (a folder of other objects, so it cannot also be an object here)")
        return data, meta

    def exists(self, bucket: str, key: str) -> bool:
        data, meta = self._paths(bucket, key)
        return data.is_file() and meta.is_file()

    def put(
        self, bucket: str, key: str, source: IO[bytes], content_type: str, cache_control: str, upsert: bool
    ) -> dict[str, Any]:
        data, _ = self._target(bucket, key)
        data.parent.mkdir(parents=True, exist_ok=True)
        tmp = data.with_name(f".{data.name}.{uuid.uuid4().hex}.tmp")
        md5 = hashlib.md5(usedforsecurity=False)
        size = 0
        try:
            with tmp.open("wb") as out:
                while chunk := source.read(1024 * 1024):
                    md5.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.place(
            bucket, key, tmp, content_type, cache_control, upsert, etag=md5.hexdigest(), size=size
        )

    def place(
        self,
        bucket: str,
        key: str,
        source: Path,
        content_type: str,
        cache_control: str,
        upsert: bool,
        *,
        etag: str,
        size: int,
    ) -> dict[str, Any]:
        """Make the finished file ``source`` (same filesystem) the object ``key``; ``source`` is gone
        afterwards, stored or not."""
        data, meta = self._target(bucket, key)
        data.parent.mkdir(parents=True, exist_ok=True)
        meta.parent.mkdir(parents=True, exist_ok=True)
        try:
            if upsert:
                os.replace(source, data)
            else:
                try:
                    os.link(source, data)  # fails if the key exists, atomically: no check-then-write race
                except FileExistsError:
                    raise _duplicate("KeyAlreadyExists") from None
        finally:
            source.unlink(missing_ok=True)
        now = _now()
        info = {
            "id": str(uuid.uuid4()),
            "content_type": content_type,
            "cache_control": cache_control,
            "size": size,
            "etag": etag,
            "created_at": now,
            "updated_at": now,
        }
        _write_atomic(meta, json.dumps(info).encode())
        return info

    def get(self, bucket: str, key: str) -> tuple[Path, dict[str, Any]]:
        data, meta = self._paths(bucket, key)
        if not data.is_file() or not meta.is_file():
            raise _no_object()
        return data, json.loads(meta.read_text())

    def remove(self, bucket: str, keys: list[str]) -> list[dict[str, Any]]:
        removed = []
        for key in keys:
            data, meta = self._paths(bucket, key)
            if data.is_file():
                info = json.loads(meta.read_text()) if meta.is_file() else {}
                data.unlink()
                meta.unlink(missing_ok=True)
                removed.append({"name": key, "bucket_id": bucket, **info})
        return removed

    def list(self, bucket: str, prefix: str, limit: int, offset: int, search: str) -> list[dict[str, Any]]:
        """One folder level, as Supabase lists: files with metadata, sub-folders with ``id: None``."""
        base = self._bucket_dir(bucket)
        self.bucket(bucket)
        prefix = prefix.strip("/")
        if prefix:
            check_object_path(prefix)
        folder = base / "objects" / prefix
        if not folder.is_dir():
            return []
        entries = []
        for child in sorted(folder.iterdir(), key=lambda p: p.name):
            if child.name.startswith(".") and child.name.endswith(".tmp"):
                continue
            if search and not child.name.startswith(search):
                continue
            if child.is_dir():
                entries.append({"name": child.name, "id": None, "metadata": None})
                continue
            _, info = self.get(bucket, f"{prefix}/{child.name}" if prefix else child.name)
            entries.append(
                {
                    "name": child.name,
                    "id": info["id"],
                    "created_at": info["created_at"],
                    "updated_at": info["updated_at"],
                    "last_accessed_at": info["updated_at"],
                    "metadata": {"size": info["size"], "mimetype": info["content_type"]},
                }
            )
        return entries[offset : offset + limit]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def service_key_for(jwt_secret: str) -> str:
    """A service-role key as Supabase issues one: an HS256 JWT ``{"role": "service_role"}``."""
    return jwt.encode(
        {"role": "service_role", "iss": "heimdex-embedded-storage", "iat": int(time.time())}, jwt_secret
    )


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise _invalid_request("Body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _invalid_request("body must be object")
    return body


def _int_field(body: dict[str, Any], name: str, default: int, *, minimum: int = 0) -> int:
    """An integer body field; like the real server's schema, a string of digits is coerced."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _invalid_request(f"body/{name} must be integer >= {minimum}")
    return value


def _capped(receive: Receive, limit: int) -> Receive:
    """``receive`` that stops a body (chunked or lying about its length) once it passes ``limit``."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise _too_large()
        return message

    return wrapped


def create_app(
    root: Path,
    jwt_secret: str,
    *,
    file_size_limit: int = DEFAULT_FILE_SIZE_LIMIT,
    resumable_size_limit: int = DEFAULT_RESUMABLE_SIZE_LIMIT,
    tus_chunk_size: int = TUS_CHUNK_SIZE,
) -> Starlette:
    """``file_size_limit`` caps standard uploads, ``resumable_size_limit`` TUS uploads; ``tus_chunk_size``
    is Supabase's 6 MiB unless a test asks for smaller chunks."""
    store = ObjectStore(root)
    secret_bytes = jwt_secret.encode()

    def is_service(request: Request) -> bool:
        """Supabase's roles: a valid service-role JWT in ``Authorization``; anything else is anon."""
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return False
        try:
            claims = jwt.decode(auth[7:].strip(), jwt_secret, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            return False
        return claims.get("role") == "service_role"

    def route(method: str, pattern: str, *, anon: Callable[[], Response] | None = None) -> Any:
        """``anon``: the answer to the anonymous role; None for the routes anyone may call."""

        def wrap(handler: Callable[..., Awaitable[Response]]) -> Route:
            async def endpoint(request: Request) -> Response:
                try:
                    if anon is not None and not is_service(request):
                        return anon()
                    return await handler(request, **request.path_params)
                except ApiError as exc:
                    return exc.response()

            return Route(PREFIX + pattern, endpoint, methods=[method])

        return wrap

    def anon_sees_no_bucket() -> Response:
        return _no_bucket().response()

    def anon_sees_no_buckets() -> Response:
        return JSONResponse([])

    def anon_cannot_create() -> Response:
        error = ApiError(
            403, "AccessDenied", "new row violates row-level security policy", error="Unauthorized"
        )
        return error.response()

    def sign(bucket: str, key: str, expires_in: Any, *, checked: bool = False) -> str:
        """``checked``: the caller knows the object exists."""
        seconds = _int_field({"expiresIn": expires_in}, "expiresIn", 0, minimum=1)
        if not checked:
            store.get(bucket, key)
        url = f"{bucket}/{key}"
        now = int(time.time())
        token = _hs256({"url": url, "iat": now, "exp": now + seconds}, secret_bytes)
        return f"/object/sign/{url}?token={token}"

    def serve(request: Request, path: Path, info: dict[str, Any]) -> Response:
        # As the real server: the content's MD5 as the etag, and no cache-control of ours.
        headers = {"etag": f'"{info.get("etag", "")}"'}
        if info.get("size", _INLINE_BYTES + 1) <= _INLINE_BYTES and "range" not in request.headers:
            # A thumbnail in one read on the loop: FileResponse's stat, open, reads and close each take
            # a thread hop, most of the server's time per image when a worker fetches hundreds at once.
            headers["last-modified"] = formatdate(path.stat().st_mtime, usegmt=True)
            headers["accept-ranges"] = "bytes"
            return Response(path.read_bytes(), media_type=info["content_type"], headers=headers)
        return FileResponse(path, media_type=info["content_type"], headers=headers)

    @route("GET", "/status")
    async def status(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @route("GET", "/bucket", anon=anon_sees_no_buckets)
    async def list_buckets(request: Request) -> Response:
        return JSONResponse(store.buckets())

    @route("POST", "/bucket", anon=anon_cannot_create)
    async def create_bucket(request: Request) -> Response:
        body = await _json_object(request)
        name = body.get("id") or body.get("name")
        if not isinstance(name, str):
            raise _invalid_request("body/name must be string")
        store.create_bucket(name, bool(body.get("public", False)))
        return JSONResponse({"name": name})

    @route("GET", "/bucket/{bucket}", anon=anon_sees_no_bucket)
    async def get_bucket(request: Request, bucket: str) -> Response:
        return JSONResponse(store.bucket(bucket))

    @route("POST", "/object/sign/{bucket}", anon=anon_sees_no_bucket)
    async def sign_many(request: Request, bucket: str) -> Response:
        body = await _json_object(request)
        paths = body.get("paths")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise _invalid_request("body/paths must be array of strings")
        expires_in = body.get("expiresIn")
        out = [
            {"error": None, "path": key, "signedURL": sign(bucket, key, expires_in, checked=True)}
            if found
            else {"error": _NO_OBJECT, "path": key, "signedURL": None}
            for key, found in zip(paths, store.signable(bucket, paths), strict=True)
        ]
        return JSONResponse(out)

    @route("POST", "/object/sign/{bucket}/{key:path}", anon=anon_sees_no_bucket)
    async def sign_one(request: Request, bucket: str, key: str) -> Response:
        body = await _json_object(request)
        return JSONResponse({"signedURL": sign(bucket, key, body.get("expiresIn"))})

    @route("GET", "/object/sign/{bucket}/{key:path}")
    async def signed_download(request: Request, bucket: str, key: str) -> Response:
        try:
            claims = jwt.decode(
                request.query_params.get("token", ""),
                jwt_secret,
                algorithms=["HS256"],
                options={"require": ["exp", "url"]},
            )
        except jwt.ExpiredSignatureError:
            raise ApiError(400, "InvalidJWT", '"exp" claim timestamp check failed') from None
        except jwt.InvalidSignatureError:
            raise ApiError(400, "InvalidJWT", "signature verification failed") from None
        except jwt.InvalidTokenError as exc:
            raise ApiError(400, "InvalidJWT", str(exc) or "invalid token") from None
        if claims["url"] != f"{bucket}/{key}":
            raise ApiError(400, "InvalidSignature", "Invalid signature")
        return serve(request, *store.get(bucket, key))

    @route("GET", "/object/info/{bucket}/{key:path}", anon=anon_sees_no_bucket)
    async def info(request: Request, bucket: str, key: str) -> Response:
        _, meta = store.get(bucket, key)
        body = {"name": key, "bucket_id": bucket, "version": meta["id"], **meta}
        return JSONResponse({**body, "metadata": {"size": meta["size"], "mimetype": meta["content_type"]}})

    @route("POST", "/object/list/{bucket}", anon=anon_sees_no_bucket)
    async def list_objects(request: Request, bucket: str) -> Response:
        body = await _json_object(request)
        for name in ("prefix", "search"):
            if not isinstance(body.get(name) or "", str):
                raise _invalid_request(f"body/{name} must be string")
        entries = store.list(
            bucket,
            body.get("prefix") or "",
            _int_field(body, "limit", 100, minimum=1),
            _int_field(body, "offset", 0),
            body.get("search") or "",
        )
        return JSONResponse(entries)

    async def upload(request: Request, bucket: str, key: str, upsert: bool) -> Response:
        store.bucket(bucket)
        check_object_path(key)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > file_size_limit + _MULTIPART_SLACK:
            raise _too_large()  # refused before a byte of the body is read
        capped = Request(request.scope, _capped(request.receive, file_size_limit + _MULTIPART_SLACK))
        # Starlette spools each file part to disk past 1 MiB: the upload never sits in memory.
        async with capped.form(max_files=1, max_fields=8) as form:
            part = form.get("file")
            if not isinstance(part, UploadFile):
                raise _invalid_request("multipart field 'file' is missing")
            if part.size is not None and part.size > file_size_limit:
                raise _too_large()
            cache_control = form.get("cacheControl") or "3600"
            if not isinstance(cache_control, str) or _CONTROL_CHARS.search(cache_control):
                raise _invalid_request("cacheControl must be text without control characters")
            content_type = part.content_type or "application/octet-stream"
            if _CONTROL_CHARS.search(content_type):
                raise _invalid_request("the file's content type must be text without control characters")
            meta = store.put(bucket, key, part.file, content_type, cache_control, upsert)
        return JSONResponse({"Id": meta["id"], "Key": f"{bucket}/{key}"})

    @route("POST", "/object/{bucket}/{key:path}", anon=anon_sees_no_bucket)
    async def upload_post(request: Request, bucket: str, key: str) -> Response:
        return await upload(request, bucket, key, request.headers.get("x-upsert", "false").lower() == "true")

    @route("PUT", "/object/{bucket}/{key:path}", anon=anon_sees_no_bucket)
    async def upload_put(request: Request, bucket: str, key: str) -> Response:
        store.get(bucket, key)  # update replaces an existing object only, as Supabase's PUT
        return await upload(request, bucket, key, True)

    @route("GET", "/object/{bucket}/{key:path}", anon=anon_sees_no_bucket)
    async def download(request: Request, bucket: str, key: str) -> Response:
        return serve(request, *store.get(bucket, key))

    @route("DELETE", "/object/{bucket}", anon=anon_sees_no_bucket)
    async def remove(request: Request, bucket: str) -> Response:
        body = await _json_object(request)
        prefixes = body.get("prefixes")
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise _invalid_request("body/prefixes must be array of strings")
        return JSONResponse(store.remove(bucket, prefixes))

    # Order matters: the sign/info/list routes must win over the generic /object/{bucket}/{key}.
    routes = [
        status, list_buckets, create_bucket, get_bucket, sign_many, sign_one, signed_download, info,
        list_objects, upload_post, upload_put, download, remove,
    ]  # fmt: skip
    routes += _tus_routes(store, is_service, size_limit=resumable_size_limit, chunk_size=tus_chunk_size)
    return Starlette(routes=routes)


# ------------------------------------------------------------------------------ resumable uploads (TUS)
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


def _b64url(text: str | bytes) -> str:
    return base64.urlsafe_b64encode(text.encode() if isinstance(text, str) else text).decode().rstrip("=")


_HS256_HEADER = _b64url('{"alg":"HS256","typ":"JWT"}')


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    """The HS256 JWT ``jwt.encode`` makes, at a quarter of its cost (one per signed URL: a job signs
    hundreds); tokens are still read with ``jwt.decode``."""
    signed = f"{_HS256_HEADER}.{_b64url(json.dumps(claims, separators=(',', ':')))}"
    return f"{signed}.{_b64url(hmac.digest(secret, signed.encode(), 'sha256'))}"


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


def _tus_routes(
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
    locks: dict[str, asyncio.Lock] = {}
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
        _write_atomic(paths(version)[0], json.dumps(asdict(upload)).encode())

    @asynccontextmanager
    async def locked(version: str) -> AsyncIterator[None]:
        """One request at a time per upload (the real server takes a Postgres advisory lock): a HEAD or
        PATCH arriving while an interrupted PATCH is still being written waits for it to finish."""
        lock = locks.setdefault(version, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), _TUS_LOCK_WAIT_S)
        except TimeoutError:
            raise TusError(423, "the upload is locked by another request; retry later") from None
        try:
            yield
        finally:
            lock.release()

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
        if _CONTROL_CHARS.search(content_type) or _CONTROL_CHARS.search(cache_control):
            raise TusError(400, "contentType and cacheControl must be text without control characters")
        upsert = request.headers.get("x-upsert", "false").lower() == "true"
        store._target(bucket, key)  # a key that cannot be an object here fails now, not at the end
        if not upsert and store.exists(bucket, key):
            raise TusError(409, "The resource already exists")
        version = uuid.uuid4().hex
        upload = _TusUpload(bucket, key, length, content_type, cache_control, upsert, _now())
        paths(version)[1].touch()
        save(version, upload)
        if length == 0:
            await finish(version, upload)
        location = f"{str(request.base_url).rstrip('/')}{base}/{_b64url(f'{bucket}/{key}/{version}')}"
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


# --------------------------------------------------------------------------------- the shared process
@dataclass(frozen=True)
class EmbeddedStorage:
    url: str  # what SUPABASE_URL would be: the storage API lives under {url}/storage/v1
    service_key: str


@dataclass(frozen=True)
class _State:
    pid: int
    url: str
    service_key: str
    jwt_secret: str


def _state_dir(home: Path) -> Path:
    return private_dir(home / "storage")


@contextmanager
def _locked(home: Path) -> Iterator[Path]:
    """Serialise starts and stops across processes; yields the state folder."""
    folder = _state_dir(home)
    with (folder / "server.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder


def _read_state(folder: Path) -> _State | None:
    try:
        return _State(**json.loads((folder / "server.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _healthy(url: str) -> bool:
    return answers(f"{url}{PREFIX}/status")


def _is_service_key(key: str, jwt_secret: str) -> bool:
    try:
        return jwt.decode(key, jwt_secret, algorithms=["HS256"]).get("role") == "service_role"
    except jwt.InvalidTokenError:
        return False


def ensure_storage_server(
    home: Path,
    *,
    file_size_limit: int = DEFAULT_FILE_SIZE_LIMIT,
    resumable_size_limit: int = DEFAULT_RESUMABLE_SIZE_LIMIT,
) -> EmbeddedStorage:
    """The state folder's storage server: reused when alive, (re)started otherwise.

    Keys persist in the state file (0600) across restarts, so signed URLs and clients made before a
    restart keep working. The server's secret reaches it through its environment, never its argv.
    ``file_size_limit`` (standard uploads) and ``resumable_size_limit`` (TUS) apply when this call starts
    the server.
    """
    with _locked(home) as folder:
        state = _read_state(folder)
        if state is not None and _healthy(state.url):
            return EmbeddedStorage(state.url, state.service_key)
        jwt_secret = state.jwt_secret if state else secrets.token_urlsafe(32)
        service_key = state.service_key if state and _is_service_key(state.service_key, jwt_secret) else None
        service_key = service_key or service_key_for(
            jwt_secret
        )  # state from before keys were JWTs: a new one
        port_file = folder / "port"
        port_file.unlink(missing_ok=True)
        with (folder / "server.log").open("ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    __name__,
                    "--root",
                    str(home / "objects"),
                    "--port",
                    "0",
                    "--port-file",
                    str(port_file),
                    "--file-size-limit",
                    str(file_size_limit),
                    "--resumable-size-limit",
                    str(resumable_size_limit),
                ],
                env={**os.environ, JWT_SECRET_ENV: jwt_secret},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # outlives this process and its Ctrl-C
            )
        try:
            url = wait_until(
                "the embedded storage server",
                lambda: port_file_url(port_file, f"{PREFIX}/status"),
                timeout_s=_START_TIMEOUT_S,
                proc=proc,
            )
        except NotReadyError as exc:
            see = f"see {folder}/server.log"
            if exc.exited is not None:
                raise StorageError(f"the embedded storage server exited at start; {see}") from None
            proc.kill()
            raise StorageError(
                f"the embedded storage server did not start in {_START_TIMEOUT_S:g} s; {see}", retryable=True
            ) from None
        state_file = folder / "server.json"
        _write_atomic(state_file, json.dumps(asdict(_State(proc.pid, url, service_key, jwt_secret))).encode())
        state_file.chmod(0o600)
        return EmbeddedStorage(url, service_key)


def storage_server_pid(home: Path) -> int | None:
    """The process id of the state folder's storage server while it answers at its recorded URL."""
    state = _read_state(_state_dir(home))
    return state.pid if state is not None and state.pid > 0 and _healthy(state.url) else None


def storage_server_running(home: Path) -> bool:
    """Whether the state folder's storage server answers at its recorded URL."""
    return storage_server_pid(home) is not None


def stop_storage_server(home: Path) -> None:
    """Stop the state folder's storage server if it runs (its objects stay on disk)."""
    with _locked(home) as folder:
        state = _read_state(folder)
        if state is None:
            return
        # Signal only a server that answers at the recorded URL: after a stop, a crash or a reboot the
        # recorded pid may belong to an unrelated process by now. pid 0 (cleared) would signal our own
        # process group, hence the guard.
        if state.pid > 0 and _healthy(state.url):
            with suppress(ProcessLookupError):
                os.kill(state.pid, signal.SIGTERM)
        state_file = folder / "server.json"
        # Keep the keys (see ensure_storage_server) but forget the process: no pid, no reachable URL.
        forgotten = _State(0, "http://127.0.0.1:0", state.service_key, state.jwt_secret)
        _write_atomic(state_file, json.dumps(asdict(forgotten)).encode())
        state_file.chmod(0o600)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder holding the buckets")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--port-file", type=Path, help="write the chosen port here once listening")
    parser.add_argument(
        "--file-size-limit",
        type=int,
        default=DEFAULT_FILE_SIZE_LIMIT,
        help="largest standard (single-request) upload, in bytes",
    )
    parser.add_argument(
        "--resumable-size-limit",
        type=int,
        default=DEFAULT_RESUMABLE_SIZE_LIMIT,
        help="largest resumable (TUS) upload, in bytes",
    )
    args = parser.parse_args(argv)

    jwt_secret = os.environ.get(JWT_SECRET_ENV) or secrets.token_urlsafe(32)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))  # bound here so that --port 0 can report the port it got
    port = sock.getsockname()[1]
    if args.port_file:
        args.port_file.write_text(str(port))
    if JWT_SECRET_ENV not in os.environ:
        key = service_key_for(jwt_secret)
        print(f"SUPABASE_URL=http://{args.host}:{port}\nSUPABASE_SERVICE_ROLE_KEY={key}", flush=True)
    app = create_app(
        args.root,
        jwt_secret,
        file_size_limit=args.file_size_limit,
        resumable_size_limit=args.resumable_size_limit,
    )
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
