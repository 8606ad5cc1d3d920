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
- resumable uploads speak TUS 1.0.0 at ``/upload/resumable`` as Supabase's do (:mod:`.storage_tus`);
  standard uploads stop at ``file_size_limit`` (50 MiB) while TUS takes up to ``resumable_size_limit``
  (50 GiB), where the real server applies one limit to both, so a large video can only come in the way
  Supabase advises for anything over 6 MB.

Objects, keys and the error shape live in :mod:`.object_store`.

Differences we keep, each a refusal where the real server would store: keys are files, so a key with
an empty segment (``a//b``), a segment over 200 bytes, or one that would make an object a folder (``a``
and ``a/b``) is 400 ``InvalidKey``; the anonymous role sees no bucket at all (row-level policies are
not modelled); there is no public-object route or image transformation.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import hmac
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

import jwt
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive

from heimdex_clip_assets.devservices.net import NotReadyError, answers, port_file_url, wait_until
from heimdex_clip_assets.devservices.object_store import (
    CONTROL_CHARS,
    PREFIX,
    ApiError,
    ObjectStore,
    check_object_path,
    invalid_request,
    no_bucket,
    too_large,
    write_atomic,
)
from heimdex_clip_assets.devservices.postgres import private_dir
from heimdex_clip_assets.devservices.storage_tus import (
    DEFAULT_RESUMABLE_SIZE_LIMIT,
    TUS_CHUNK_SIZE,
    b64url,
    tus_routes,
)
from heimdex_clip_contract.errors import StorageError

JWT_SECRET_ENV = "HEIMDEX_STORAGE_JWT_SECRET"
# Supabase's default global file size limit (its FILE_SIZE_LIMIT), in bytes.
DEFAULT_FILE_SIZE_LIMIT = 50 * 1024 * 1024
_INLINE_BYTES = 1024 * 1024  # objects up to this size are served from one read, not streamed
# Room for the multipart framing and the cacheControl field around the file's own bytes.
_MULTIPART_SLACK = 64 * 1024
_START_TIMEOUT_S = 20.0
_PR_SET_PDEATHSIG = 1  # prctl: the signal a process gets when its parent dies
_NO_OBJECT = "Either the object does not exist or you do not have access to it"  # Supabase's wording


def service_key_for(jwt_secret: str) -> str:
    """A service-role key as Supabase issues one: an HS256 JWT ``{"role": "service_role"}``."""
    return jwt.encode(
        {"role": "service_role", "iss": "heimdex-embedded-storage", "iat": int(time.time())}, jwt_secret
    )


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise invalid_request("Body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid_request("body must be object")
    return body


def _int_field(body: dict[str, Any], name: str, default: int, *, minimum: int = 0) -> int:
    """An integer body field; like the real server's schema, a string of digits is coerced."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid_request(f"body/{name} must be integer >= {minimum}")
    return value


def _capped(receive: Receive, limit: int) -> Receive:
    """``receive`` that stops a body (chunked or lying about its length) once it passes ``limit``."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise too_large()
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
        return no_bucket().response()

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
            raise invalid_request("body/name must be string")
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
            raise invalid_request("body/paths must be array of strings")
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
                raise invalid_request(f"body/{name} must be string")
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
            raise too_large()  # refused before a byte of the body is read
        capped = Request(request.scope, _capped(request.receive, file_size_limit + _MULTIPART_SLACK))
        # Starlette spools each file part to disk past 1 MiB: the upload never sits in memory.
        async with capped.form(max_files=1, max_fields=8) as form:
            part = form.get("file")
            if not isinstance(part, UploadFile):
                raise invalid_request("multipart field 'file' is missing")
            if part.size is not None and part.size > file_size_limit:
                raise too_large()
            cache_control = form.get("cacheControl") or "3600"
            if not isinstance(cache_control, str) or CONTROL_CHARS.search(cache_control):
                raise invalid_request("cacheControl must be text without control characters")
            content_type = part.content_type or "application/octet-stream"
            if CONTROL_CHARS.search(content_type):
                raise invalid_request("the file's content type must be text without control characters")
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
            raise invalid_request("body/prefixes must be array of strings")
        return JSONResponse(store.remove(bucket, prefixes))

    # Order matters: the sign/info/list routes must win over the generic /object/{bucket}/{key}.
    routes = [
        status, list_buckets, create_bucket, get_bucket, sign_many, sign_one, signed_download, info,
        list_objects, upload_post, upload_put, download, remove,
    ]  # fmt: skip
    routes += tus_routes(store, is_service, size_limit=resumable_size_limit, chunk_size=tus_chunk_size)
    return Starlette(routes=routes)


_HS256_HEADER = b64url('{"alg":"HS256","typ":"JWT"}')


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    """The HS256 JWT ``jwt.encode`` makes, at a quarter of its cost (one per signed URL: a job signs
    hundreds); tokens are still read with ``jwt.decode``."""
    signed = f"{_HS256_HEADER}.{b64url(json.dumps(claims, separators=(',', ':')))}"
    return f"{signed}.{b64url(hmac.digest(secret, signed.encode(), 'sha256'))}"


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
    workers: int = 1,
) -> EmbeddedStorage:
    """The state folder's storage server: reused when alive, (re)started otherwise.

    Keys persist in the state file (0600) across restarts, so signed URLs and clients made before a
    restart keep working. The server's secret reaches it through its environment, never its argv.
    ``file_size_limit`` (standard uploads), ``resumable_size_limit`` (TUS) and ``workers`` (processes
    serving its port) apply when this call starts the server.
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
                    "--workers",
                    str(workers),
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
        write_atomic(state_file, json.dumps(asdict(_State(proc.pid, url, service_key, jwt_secret))).encode())
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
        write_atomic(state_file, json.dumps(asdict(forgotten)).encode())
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
    parser.add_argument(
        "--workers", type=int, default=1, help="processes serving the one port (a GPU host's downloads)"
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
    serve = uvicorn.Server(uvicorn.Config(app, log_level="warning")).run
    children = [_fork_worker(serve, sock) for _ in range(args.workers - 1)]
    try:
        serve(sockets=[sock])
    finally:
        for pid in children:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _fork_worker(serve: Callable[..., None], sock: socket.socket) -> int:
    """A process serving the same listening socket (the kernel spreads the connections); it ends with
    the first one, however that one ends."""
    pid = os.fork()
    if pid:
        return pid
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        serve(sockets=[sock])
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
