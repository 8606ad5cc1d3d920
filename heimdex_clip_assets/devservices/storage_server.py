"""An embedded, Supabase-compatible storage server: objects on disk, served over HTTP on 127.0.0.1.

No Supabase server can run here, so with ``SUPABASE_URL`` unset this stands in for it, speaking the
subset of Supabase Storage's REST API that supabase-py's storage3 uses. The pipeline therefore runs the
one ``SupabaseStorage`` code path in both cases, and the worker fetches signed URLs from it as it would
from Supabase. It runs as a detached process shared by every pipeline process
(:func:`ensure_storage_server`), or as a command::

    python -m heimdex_clip_assets.devservices.storage_server --root DIR --port 8787

Security mirrors Supabase: every route but signed-URL downloads needs the service key; signed URLs
carry an HS256 JWT bound to one object and an expiry; object paths cannot leave their bucket.
"""

from __future__ import annotations

import argparse
import fcntl
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
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from heimdex_clip_assets.devservices.postgres import private_dir
from heimdex_clip_contract.errors import StorageError

PREFIX = "/storage/v1"
SERVICE_KEY_ENV = "HEIMDEX_STORAGE_SERVICE_KEY"
JWT_SECRET_ENV = "HEIMDEX_STORAGE_JWT_SECRET"
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_START_TIMEOUT_S = 20.0
_NO_OBJECT = "Either the object does not exist or you do not have access to it"  # Supabase's wording


class ApiError(Exception):
    """An error answered as Supabase's JSON body ``{"statusCode", "error", "message"}``."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message

    def response(self) -> JSONResponse:
        body = {"statusCode": str(self.status), "error": self.error, "message": self.message}
        return JSONResponse(body, status_code=self.status)


def _not_found() -> ApiError:
    # storage3's exists() reads a 404 with error "not_found" as "no such object".
    return ApiError(404, "not_found", "Object not found")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def check_object_path(path: str) -> str:
    """Refuse keys that could name something outside the bucket, before any filesystem call."""
    segments = path.split("/")
    if (
        not path
        or "\\" in path
        or "\x00" in path
        or path.startswith("/")
        or any(seg in ("", ".", "..") for seg in segments)
    ):
        raise ApiError(400, "InvalidKey", f"Invalid key: {path!r}")
    return path


class ObjectStore:
    """Buckets as folders: ``ROOT/<bucket>/objects/<key>`` holds the bytes and ``.../meta/<key>.json``
    the content type and timestamps, so object keys can never collide with metadata."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _bucket_dir(self, bucket: str) -> Path:
        if not _BUCKET_RE.fullmatch(bucket):
            raise ApiError(400, "InvalidBucketName", f"Invalid bucket name: {bucket!r}")
        return self.root / bucket

    def bucket(self, bucket: str) -> dict[str, Any]:
        info = self._bucket_dir(bucket) / "bucket.json"
        if not info.exists():
            raise ApiError(404, "Bucket not found", "Bucket not found")
        return json.loads(info.read_text())

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
            raise ApiError(409, "Duplicate", "The resource already exists") from None
        _write_atomic(folder / "bucket.json", json.dumps(info).encode())

    def _paths(self, bucket: str, key: str) -> tuple[Path, Path]:
        self.bucket(bucket)
        base = self._bucket_dir(bucket)
        check_object_path(key)
        data, meta = base / "objects" / key, base / "meta" / f"{key}.json"
        # Belt and braces after check_object_path: symlinks planted on disk still cannot lead out.
        for path, top in ((data, base / "objects"), (meta, base / "meta")):
            if not path.resolve().is_relative_to(top.resolve()):
                raise ApiError(400, "InvalidKey", f"Invalid key: {key!r}")
        return data, meta

    def put(
        self, bucket: str, key: str, body: bytes, content_type: str, cache_control: str, upsert: bool
    ) -> dict[str, Any]:
        data, meta = self._paths(bucket, key)
        data.parent.mkdir(parents=True, exist_ok=True)
        meta.parent.mkdir(parents=True, exist_ok=True)
        tmp = data.with_name(f".{data.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(body)
        try:
            if upsert:
                os.replace(tmp, data)
            else:
                try:
                    os.link(tmp, data)  # fails if the key exists, atomically: no check-then-write race
                except FileExistsError:
                    raise ApiError(409, "Duplicate", "The resource already exists") from None
        finally:
            tmp.unlink(missing_ok=True)
        now = _now()
        info = {
            "id": str(uuid.uuid4()),
            "content_type": content_type,
            "cache_control": cache_control,
            "size": len(body),
            "created_at": now,
            "updated_at": now,
        }
        _write_atomic(meta, json.dumps(info).encode())
        return info

    def get(self, bucket: str, key: str) -> tuple[Path, dict[str, Any]]:
        data, meta = self._paths(bucket, key)
        if not data.is_file() or not meta.is_file():
            raise _not_found()
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


def create_app(root: Path, service_key: str, jwt_secret: str) -> Starlette:
    store = ObjectStore(root)

    def authorize(request: Request) -> None:
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("apikey")
        if not token:
            raise ApiError(400, "Error", "headers must have required property 'authorization'")
        if not hmac.compare_digest(token.encode(), service_key.encode()):
            raise ApiError(403, "Unauthorized", "invalid signature")

    def route(method: str, pattern: str, *, auth: bool = True) -> Any:
        def wrap(handler: Any) -> Route:
            async def endpoint(request: Request) -> Response:
                try:
                    if auth:
                        authorize(request)
                    return await handler(request, **request.path_params)
                except ApiError as exc:
                    return exc.response()

            return Route(PREFIX + pattern, endpoint, methods=[method])

        return wrap

    def sign(bucket: str, key: str, expires_in: Any) -> str:
        try:
            seconds = int(expires_in)
        except (TypeError, ValueError):
            raise ApiError(400, "InvalidRequest", "expiresIn must be a number of seconds") from None
        if seconds <= 0:
            raise ApiError(400, "InvalidRequest", "expiresIn must be positive")
        store.get(bucket, key)
        url = f"{bucket}/{key}"
        token = jwt.encode(
            {"url": url, "iat": int(time.time()), "exp": int(time.time()) + seconds}, jwt_secret
        )
        return f"/object/sign/{url}?token={token}"

    def serve(path: Path, info: dict[str, Any]) -> Response:
        return FileResponse(
            path,
            media_type=info["content_type"],
            headers={"cache-control": f"max-age={info['cache_control']}"},
        )

    @route("GET", "/status", auth=False)
    async def status(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @route("GET", "/bucket")
    async def list_buckets(request: Request) -> Response:
        return JSONResponse(store.buckets())

    @route("POST", "/bucket")
    async def create_bucket(request: Request) -> Response:
        body = await request.json()
        store.create_bucket(str(body.get("id") or body.get("name")), bool(body.get("public", False)))
        return JSONResponse({"name": body.get("id") or body.get("name")})

    @route("GET", "/bucket/{bucket}")
    async def get_bucket(request: Request, bucket: str) -> Response:
        return JSONResponse(store.bucket(bucket))

    @route("POST", "/object/sign/{bucket}")
    async def sign_many(request: Request, bucket: str) -> Response:
        body = await request.json()
        out = []
        for key in body.get("paths") or []:
            try:
                out.append(
                    {"error": None, "path": key, "signedURL": sign(bucket, key, body.get("expiresIn"))}
                )
            except ApiError as exc:
                if exc.status != 404:
                    raise
                out.append({"error": _NO_OBJECT, "path": key, "signedURL": None})
        return JSONResponse(out)

    @route("POST", "/object/sign/{bucket}/{key:path}")
    async def sign_one(request: Request, bucket: str, key: str) -> Response:
        body = await request.json()
        return JSONResponse({"signedURL": sign(bucket, key, body.get("expiresIn"))})

    @route("GET", "/object/sign/{bucket}/{key:path}", auth=False)
    async def signed_download(request: Request, bucket: str, key: str) -> Response:
        try:
            claims = jwt.decode(
                request.query_params.get("token", ""),
                jwt_secret,
                algorithms=["HS256"],
                options={"require": ["exp", "url"]},
            )
        except jwt.ExpiredSignatureError:
            raise ApiError(400, "InvalidJWT", "jwt expired") from None
        except jwt.InvalidTokenError as exc:
            raise ApiError(400, "InvalidJWT", str(exc) or "invalid token") from None
        if claims["url"] != f"{bucket}/{key}":
            raise ApiError(400, "InvalidSignature", "The url do not match the signature")
        return serve(*store.get(bucket, key))

    @route("GET", "/object/info/{bucket}/{key:path}")
    async def info(request: Request, bucket: str, key: str) -> Response:
        _, meta = store.get(bucket, key)
        body = {"name": key, "bucket_id": bucket, "version": meta["id"], **meta}
        return JSONResponse({**body, "metadata": {"size": meta["size"], "mimetype": meta["content_type"]}})

    @route("POST", "/object/list/{bucket}")
    async def list_objects(request: Request, bucket: str) -> Response:
        body = await request.json()
        entries = store.list(
            bucket,
            str(body.get("prefix") or ""),
            int(body.get("limit") or 100),
            int(body.get("offset") or 0),
            str(body.get("search") or ""),
        )
        return JSONResponse(entries)

    async def upload(request: Request, bucket: str, key: str, upsert: bool) -> Response:
        form = await request.form()
        part = form.get("file")
        if part is None or isinstance(part, str):
            raise ApiError(400, "InvalidRequest", "multipart field 'file' is missing")
        content_type = part.content_type or "application/octet-stream"
        cache_control = str(form.get("cacheControl") or "3600")
        meta = store.put(bucket, key, await part.read(), content_type, cache_control, upsert)
        return JSONResponse({"Id": meta["id"], "Key": f"{bucket}/{key}"})

    @route("POST", "/object/{bucket}/{key:path}")
    async def upload_post(request: Request, bucket: str, key: str) -> Response:
        return await upload(request, bucket, key, request.headers.get("x-upsert", "false").lower() == "true")

    @route("PUT", "/object/{bucket}/{key:path}")
    async def upload_put(request: Request, bucket: str, key: str) -> Response:
        store.get(bucket, key)  # update replaces an existing object only, as Supabase's PUT
        return await upload(request, bucket, key, True)

    @route("GET", "/object/{bucket}/{key:path}")
    async def download(request: Request, bucket: str, key: str) -> Response:
        return serve(*store.get(bucket, key))

    @route("DELETE", "/object/{bucket}")
    async def remove(request: Request, bucket: str) -> Response:
        body = await request.json()
        return JSONResponse(store.remove(bucket, [str(p) for p in body.get("prefixes") or []]))

    # Order matters: the sign/info/list routes must win over the generic /object/{bucket}/{key}.
    routes = [
        status, list_buckets, create_bucket, get_bucket, sign_many, sign_one, signed_download, info,
        list_objects, upload_post, upload_put, download, remove,
    ]  # fmt: skip
    return Starlette(routes=routes)


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
    try:
        return httpx.get(f"{url}{PREFIX}/status", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ensure_storage_server(home: Path) -> EmbeddedStorage:
    """The state folder's storage server: reused when alive, (re)started otherwise.

    Keys persist in the state file (0600) across restarts, so signed URLs and clients made before a
    restart keep working. The server's secrets reach it through its environment, never its argv.
    """
    with _locked(home) as folder:
        state = _read_state(folder)
        if state is not None and _healthy(state.url):
            return EmbeddedStorage(state.url, state.service_key)
        service_key = state.service_key if state else secrets.token_urlsafe(32)
        jwt_secret = state.jwt_secret if state else secrets.token_urlsafe(32)
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
                ],
                env={**os.environ, SERVICE_KEY_ENV: service_key, JWT_SECRET_ENV: jwt_secret},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # outlives this process and its Ctrl-C
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StorageError(f"the embedded storage server exited at start; see {folder}/server.log")
            if port_file.exists() and (port := port_file.read_text().strip()):
                url = f"http://127.0.0.1:{port}"
                if _healthy(url):
                    state_file = folder / "server.json"
                    _write_atomic(
                        state_file,
                        json.dumps(asdict(_State(proc.pid, url, service_key, jwt_secret))).encode(),
                    )
                    state_file.chmod(0o600)
                    return EmbeddedStorage(url, service_key)
            time.sleep(0.05)
        proc.kill()
        raise StorageError(
            f"the embedded storage server did not start in {_START_TIMEOUT_S:g} s; see {folder}/server.log",
            retryable=True,
        )


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
    args = parser.parse_args(argv)

    service_key = os.environ.get(SERVICE_KEY_ENV) or secrets.token_urlsafe(32)
    jwt_secret = os.environ.get(JWT_SECRET_ENV) or secrets.token_urlsafe(32)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))  # bound here so that --port 0 can report the port it got
    port = sock.getsockname()[1]
    if args.port_file:
        args.port_file.write_text(str(port))
    if SERVICE_KEY_ENV not in os.environ:
        print(f"SUPABASE_URL=http://{args.host}:{port}\nSUPABASE_SERVICE_ROLE_KEY={service_key}", flush=True)
    app = create_app(args.root, service_key, jwt_secret)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
