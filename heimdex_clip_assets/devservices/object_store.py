"""The embedded storage server's objects on disk: buckets as folders, keys as files, and the errors it
answers with in Supabase Storage's shape (see :mod:`.storage_server` for the server and what it models).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from starlette.responses import JSONResponse

PREFIX = "/storage/v1"  # every route lives under it, as on Supabase
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# A key segment is a file name (plus ".json" for its metadata, and a temp-name prefix and suffix of 38):
# 200 bytes keeps every one under the usual 255-byte NAME_MAX. 1024 bytes is S3's (and Supabase's) key limit.
_MAX_SEGMENT_BYTES = 200
_MAX_KEY_BYTES = 1024
_FOLDER_VERDICTS = 10_000  # folders whose "inside the bucket" verdict is kept
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


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


def no_object() -> ApiError:
    # storage3's exists() reads error "not_found" with statusCode 404 as "no such object".
    return ApiError(404, "NoSuchKey", "Object not found", error="not_found")


def no_bucket() -> ApiError:
    return ApiError(404, "NoSuchBucket", "Bucket not found", error="Bucket not found")


def duplicate(code: str) -> ApiError:
    return ApiError(409, code, "The resource already exists", error="Duplicate")


def invalid_key(key: str, why: str = "") -> ApiError:
    return ApiError(400, "InvalidKey", f"Invalid key: {key}{why}")


def invalid_request(message: str) -> ApiError:
    return ApiError(400, "InvalidRequest", message)


def too_large() -> ApiError:
    return ApiError(
        413, "EntityTooLarge", "The object exceeded the maximum allowed size", error="Payload too large"
    )


def now_iso() -> str:
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
        raise invalid_key(path)
    if len(path.encode()) > _MAX_KEY_BYTES:
        raise invalid_key(path[:64] + "...", f" (longer than {_MAX_KEY_BYTES} bytes)")
    if any(len(seg.encode()) > _MAX_SEGMENT_BYTES for seg in segments):
        raise invalid_key(
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
            raise no_bucket() from None
        known = self._buckets.get(bucket)
        if known is None or known[0] != stamp:
            known = self._buckets[bucket] = stamp, json.loads(info.read_text())
        return known[1]

    def buckets(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.root.glob("*/bucket.json"))]

    def create_bucket(self, bucket: str, public: bool) -> None:
        folder = self._bucket_dir(bucket)
        now = now_iso()
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
            raise duplicate("BucketAlreadyExists") from None
        write_atomic(folder / "bucket.json", json.dumps(info).encode())

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
                raise invalid_key(key)
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

    def target(self, bucket: str, key: str) -> tuple[Path, Path]:
        """Where ``key``'s bytes and metadata go, refusing keys that cannot be files here (an object
        cannot also be a folder on disk: "a" then "a/b", or the reverse)."""
        data, meta = self._paths(bucket, key)
        objects = self._bucket_dir(bucket) / "objects"
        for parent in data.relative_to(objects).parents:
            if parent != Path(".") and (objects / parent).is_file():
                raise invalid_key(key, f" ('{parent}' is an object, so it cannot also be a folder here)")
        if data.is_dir():
            raise invalid_key(key, " (a folder of other objects, so it cannot also be an object here)")
        return data, meta

    def exists(self, bucket: str, key: str) -> bool:
        return self.signable(bucket, [key])[0]

    def put(
        self, bucket: str, key: str, source: IO[bytes], content_type: str, cache_control: str, upsert: bool
    ) -> dict[str, Any]:
        data, _ = self.target(bucket, key)
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
        data, meta = self.target(bucket, key)
        data.parent.mkdir(parents=True, exist_ok=True)
        meta.parent.mkdir(parents=True, exist_ok=True)
        try:
            if upsert:
                os.replace(source, data)
            else:
                try:
                    os.link(source, data)  # fails if the key exists, atomically: no check-then-write race
                except FileExistsError:
                    raise duplicate("KeyAlreadyExists") from None
        finally:
            source.unlink(missing_ok=True)
        now = now_iso()
        info = {
            "id": str(uuid.uuid4()),
            "content_type": content_type,
            "cache_control": cache_control,
            "size": size,
            "etag": etag,
            "created_at": now,
            "updated_at": now,
        }
        write_atomic(meta, json.dumps(info).encode())
        return info

    def get(self, bucket: str, key: str) -> tuple[Path, dict[str, Any]]:
        data, meta = self._paths(bucket, key)
        if not data.is_file() or not meta.is_file():
            raise no_object()
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


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
