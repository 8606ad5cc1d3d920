"""Resumable (TUS) uploads: ``SupabaseStorage`` against the embedded storage server's TUS endpoints.

The server is the real app (``create_app``) on loopback, in this process so that a recording layer can
say what it saw; small chunk sizes keep most tests fast, and one test sends a 60 MiB file in Supabase's
own 6 MiB chunks past the 50 MiB standard-upload cap. An interrupted chunk is a real cut connection,
made by a TCP proxy between the client and the server.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from heimdex_clip_assets.adapters.storage import SupabaseStorage, resumable_endpoint
from heimdex_clip_assets.devservices.net import free_port, serve_in_thread
from heimdex_clip_assets.devservices.storage_server import (
    DEFAULT_FILE_SIZE_LIMIT,
    create_app,
    service_key_for,
)
from heimdex_clip_assets.devservices.storage_tus import TUS_CHUNK_SIZE
from heimdex_clip_contract.errors import NotFoundError, StorageError
from tests.fixtures.fake_servers import TcpServer

KiB, MiB = 1024, 1024 * 1024
CHUNK = 64 * KiB
SECRET = "tus-test-secret-0123456789abcdef0123"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: int = 0  # bytes of body that reached the app


@dataclass
class Server:
    url: str
    key: str
    root: Path
    seen: list[Seen] = field(default_factory=list)

    def requests(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method]

    def client(self, bucket: str = "videos", *, url: str | None = None, **kw: Any) -> SupabaseStorage:
        kw.setdefault("resumable_threshold", CHUNK)
        kw.setdefault("chunk_size", CHUNK)
        return SupabaseStorage(url or self.url, self.key, bucket, **kw)


def recording(app: Any, seen: list[Seen]) -> Any:
    """ASGI middleware noting each request and how many body bytes the app read."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        note = Seen(
            scope["method"], scope["path"], {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        )
        seen.append(note)

        async def counting() -> Any:
            message = await receive()
            note.body += len(message.get("body", b""))
            return message

        return await app(scope, counting, send)

    return wrapped


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Any]:
    numbers = itertools.count()
    with contextlib.ExitStack() as servers:

        def start(**limits: int) -> Server:
            limits.setdefault("file_size_limit", 4 * CHUNK)
            limits.setdefault("tus_chunk_size", CHUNK)
            root = tmp_path / f"objects-{next(numbers)}"
            state = Server("", service_key_for(SECRET), root)
            app = recording(create_app(root, SECRET, **limits), state.seen)
            state.url = servers.enter_context(serve_in_thread(app))
            return state

        yield start


class CuttingProxy(TcpServer):
    """Forwards TCP to ``upstream``; once, after ``cut_after`` bytes from clients, it closes both ends
    of that connection mid-request, as a dropped network would."""

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port, self.cut_after, self.sent, self.cut = upstream_port, cut_after, 0, False
        self.lock = threading.Lock()
        super().__init__(self._connect)

    def _connect(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        try:
            while data := src.recv(64 * KiB):
                if outbound:
                    with self.lock:
                        room = self.cut_after - self.sent if not self.cut else len(data)
                        if room < len(data):
                            dst.sendall(data[: max(room, 0)])
                            self.cut = True
                            raise ConnectionResetError("cut")
                        self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def metadata(header: str) -> dict[str, str]:
    pairs = (item.split(" ") for item in header.split(","))
    return {k: base64.b64decode(v).decode() for k, v in pairs}


def test_large_file_goes_through_tus_in_whole_chunks(make_server: Any, tmp_path: Path) -> None:
    server = make_server()
    storage = server.client()
    video = tmp_path / "clip.mp4"
    video.write_bytes(os.urandom(3 * CHUNK + 1000))

    storage.upload("owner/video/source.mp4", video, content_type="video/mp4", upsert=False)

    out = tmp_path / "back.mp4"
    storage.download_to("owner/video/source.mp4", out)
    assert out.read_bytes() == video.read_bytes()
    [create] = [s for s in server.requests("POST") if s.path == "/storage/v1/upload/resumable"]
    assert create.headers["tus-resumable"] == "1.0.0"
    assert create.headers["upload-length"] == str(video.stat().st_size)
    assert create.headers["x-upsert"] == "false"
    assert create.headers["authorization"] == f"Bearer {server.key}"
    assert metadata(create.headers["upload-metadata"]) == {
        "bucketName": "videos",
        "objectName": "owner/video/source.mp4",
        "contentType": "video/mp4",
        "cacheControl": "3600",
    }
    patches = server.requests("PATCH")
    assert [p.body for p in patches] == [CHUNK, CHUNK, CHUNK, 1000]
    assert [int(p.headers["upload-offset"]) for p in patches] == [0, CHUNK, 2 * CHUNK, 3 * CHUNK]
    assert {p.headers["content-type"] for p in patches} == {"application/offset+octet-stream"}
    assert not [s for s in server.requests("POST") if s.path.startswith("/storage/v1/object/videos/")]
    signed = storage.create_signed_url("owner/video/source.mp4")
    assert httpx.get(signed).headers["content-type"] == "video/mp4"


def test_registering_a_video_uploads_it_through_tus(
    make_server: Any, sample_video: Path, store: Any, tmp_path: Path
) -> None:
    """The pipeline's own path: ``register_video`` hands the file to storage, which sends it resumably."""
    from heimdex_clip_assets.pipeline.register import register_video

    server = make_server()
    storage = server.client()
    assert sample_video.stat().st_size > CHUNK
    owner = "00000000-0000-4000-8000-00000000abcd"

    video_id = register_video(sample_video, store=store, storage=storage, owner_id=owner)

    key = store.get_video(video_id).storage_path
    assert key == f"{owner}/{video_id}/source.mp4"
    [create] = [s for s in server.requests("POST") if s.path == "/storage/v1/upload/resumable"]
    assert metadata(create.headers["upload-metadata"])["objectName"] == key
    assert sum(p.body for p in server.requests("PATCH")) == sample_video.stat().st_size
    storage.download_to(key, tmp_path / "back.mp4")
    assert (tmp_path / "back.mp4").read_bytes() == sample_video.read_bytes()


def test_small_file_keeps_the_standard_upload(make_server: Any, tmp_path: Path) -> None:
    server = make_server()
    storage = server.client()
    small = tmp_path / "small.mp4"
    small.write_bytes(b"v" * CHUNK)  # at the threshold, not over it

    storage.upload("o/v/source.mp4", small, content_type="video/mp4")

    assert storage.download("o/v/source.mp4") == small.read_bytes()
    assert not server.requests("PATCH")
    assert [s.path for s in server.requests("POST")][-1] == "/storage/v1/object/videos/o/v/source.mp4"


def test_interrupted_chunk_resumes_from_the_servers_offset(make_server: Any, tmp_path: Path) -> None:
    server = make_server()
    proxy = CuttingProxy(int(server.url.rsplit(":", 1)[1]), cut_after=int(2.3 * CHUNK))
    try:
        storage = server.client(url=proxy.url)
        video = tmp_path / "clip.mp4"
        video.write_bytes(os.urandom(5 * CHUNK + 77))

        storage.upload("o/v/source.mp4", video, content_type="video/mp4")
    finally:
        proxy.close()

    assert proxy.cut
    assert storage.download("o/v/source.mp4") == video.read_bytes()
    patches = server.requests("PATCH")
    cut = next(i for i, p in enumerate(patches) if p.body < int(p.headers["content-length"]))
    resumed_at = patches[cut].headers["upload-offset"]
    kept = int(resumed_at) + patches[cut].body
    # The client asked where the upload stood (the server keeps what it had read of the cut chunk, here
    # often nothing) and went on from there, not from 0: nothing the server had was sent again, and the
    # chunk after the cut ends on the next chunk boundary, so the ones after it are whole again.
    assert server.requests("HEAD")
    assert int(patches[cut + 1].headers["upload-offset"]) == kept >= int(resumed_at) == 2 * CHUNK
    assert int(patches[cut + 1].headers["content-length"]) == (kept // CHUNK + 1) * CHUNK - kept
    assert sum(p.body for p in patches) == video.stat().st_size


def test_file_over_the_standard_cap_uploads_in_6_mib_chunks(make_server: Any, tmp_path: Path) -> None:
    """Supabase's own sizes: 6 MiB chunks, the 50 MiB standard-upload cap; the standard upload of the
    same file is refused."""
    server = make_server(file_size_limit=DEFAULT_FILE_SIZE_LIMIT, tus_chunk_size=TUS_CHUNK_SIZE)
    storage = server.client(resumable_threshold=TUS_CHUNK_SIZE, chunk_size=TUS_CHUNK_SIZE)
    video = tmp_path / "long.mp4"
    size = DEFAULT_FILE_SIZE_LIMIT + 10 * MiB + 3
    with video.open("wb") as fh:
        fh.truncate(size)  # sparse: cheap to make, still 60 MiB on the wire

    storage.upload("o/v/source.mp4", video, content_type="video/mp4")

    patches = server.requests("PATCH")
    assert [p.body for p in patches[:-1]] == [TUS_CHUNK_SIZE] * (len(patches) - 1)
    assert sum(p.body for p in patches) == size
    assert len(patches) == size // TUS_CHUNK_SIZE + 1
    assert storage._call("info", lambda: storage._files.info("o/v/source.mp4"))["size"] == size

    standard = server.client(resumable_threshold=size)  # the same file, forced through the standard upload
    with pytest.raises(StorageError, match="exceeded the maximum allowed size") as info:
        standard.upload("o/v/standard.mp4", video, content_type="video/mp4")
    assert not info.value.retryable


def one_sentence(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_refusals_are_one_sentence_errors(make_server: Any, tmp_path: Path) -> None:
    server = make_server(resumable_size_limit=4 * CHUNK)
    storage = server.client()
    video = tmp_path / "clip.mp4"
    video.write_bytes(os.urandom(2 * CHUNK))
    huge = tmp_path / "huge.mp4"
    huge.write_bytes(os.urandom(4 * CHUNK + 1))

    with pytest.raises(
        StorageError, match=r"Maximum size exceeded \(413\); raise the file size limit"
    ) as info:
        storage.upload("o/v/huge.mp4", huge, content_type="video/mp4")
    assert not info.value.retryable and not server.requests("PATCH")
    one_sentence(info.value)

    storage.upload("o/v/source.mp4", video, content_type="video/mp4")
    with pytest.raises(StorageError, match=r"The resource already exists \(409\)") as info:
        storage.upload("o/v/source.mp4", video, content_type="video/mp4", upsert=False)
    assert not info.value.retryable
    one_sentence(info.value)
    storage.upload("o/v/source.mp4", huge.read_bytes()[: 2 * CHUNK], upsert=True)  # upsert replaces

    with pytest.raises(StorageError, match="Invalid key") as info:
        storage.upload("o//v.mp4", video, content_type="video/mp4")
    one_sentence(info.value)

    storage.upload("o/v/other.mp4", video)
    storage.bucket = "nope"  # a bucket that does not exist (or was deleted since)
    with pytest.raises(NotFoundError, match=r"Bucket not found \(404\)") as info:
        storage.upload("o/v/source.mp4", video, content_type="video/mp4")
    one_sentence(info.value)


def test_unreachable_server_is_a_retryable_error(make_server: Any, tmp_path: Path) -> None:
    server = make_server()
    storage = server.client()
    video = tmp_path / "clip.mp4"
    video.write_bytes(os.urandom(2 * CHUNK))
    storage.url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match="cannot reach storage") as info:
        storage.upload("o/v/source.mp4", video, content_type="video/mp4")
    assert info.value.retryable
    one_sentence(info.value)


def test_protocol_errors_at_the_server(make_server: Any) -> None:
    """The TUS rules, spoken to the server directly: each refusal is the real status and a plain-text
    sentence, as Supabase's tus routes answer."""
    server = make_server()
    server.client()  # creates the bucket
    endpoint = f"{server.url}/storage/v1/upload/resumable"
    auth = {"Authorization": f"Bearer {server.key}", "Tus-Resumable": "1.0.0"}
    meta = ",".join(
        f"{k} {base64.b64encode(v.encode()).decode()}"
        for k, v in {"bucketName": "videos", "objectName": "a/b.mp4", "contentType": "video/mp4"}.items()
    )
    create = {**auth, "Upload-Length": str(3 * CHUNK), "Upload-Metadata": meta}

    assert httpx.post(endpoint, headers={**create, "Tus-Resumable": "0.2.2"}).status_code == 412
    anon = httpx.post(endpoint, headers={**create, "Authorization": "Bearer not-a-key"})
    assert (anon.status_code, anon.text) == (403, "new row violates row-level security policy")
    no_meta = httpx.post(endpoint, headers={**auth, "Upload-Length": "10"})
    assert no_meta.status_code == 400 and "bucketName and objectName" in no_meta.text

    created = httpx.post(endpoint, headers=create)
    assert created.status_code == 201
    location = created.headers["location"]
    assert location.startswith(endpoint + "/")

    def patch(offset: int, body: bytes, **headers: str) -> httpx.Response:
        sent = {**auth, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}
        return httpx.patch(location, headers={**sent, **headers}, content=body)

    odd = patch(0, b"x" * (CHUNK - 1))
    assert odd.status_code == 400 and f"multiple of {CHUNK} bytes" in odd.text
    assert patch(0, b"x" * CHUNK, **{"Content-Type": "application/json"}).status_code == 415
    assert patch(0, b"x" * CHUNK).status_code == 204
    conflict = patch(0, b"x" * CHUNK)
    assert conflict.status_code == 409 and f"at byte {CHUNK}" in conflict.text
    assert patch(CHUNK, b"x" * 3 * CHUNK).status_code == 413  # past Upload-Length

    head = httpx.head(location, headers=auth)
    assert (head.status_code, head.headers["upload-offset"], head.headers["upload-length"]) == (
        200,
        str(CHUNK),
        str(3 * CHUNK),
    )
    assert patch(CHUNK, b"y" * 2 * CHUNK).status_code == 204  # the rest in one piece ending at the end
    assert httpx.head(location, headers=auth).headers["upload-offset"] == str(3 * CHUNK)
    assert patch(3 * CHUNK, b"").status_code == 204  # a finished upload takes nothing more
    assert patch(3 * CHUNK, b"z").status_code == 413
    assert httpx.head(endpoint + "/bm9wZQ", headers=auth).status_code == 404


def test_hosted_projects_upload_to_the_direct_storage_host() -> None:
    assert resumable_endpoint("https://abcd1234.supabase.co") == (
        "https://abcd1234.storage.supabase.co/storage/v1/upload/resumable"
    )
    assert resumable_endpoint("https://abcd1234.storage.supabase.co/") == (
        "https://abcd1234.storage.supabase.co/storage/v1/upload/resumable"
    )
    for other in ("http://127.0.0.1:8787", "https://storage.example.com", "https://x.y.supabase.co"):
        assert resumable_endpoint(other) == f"{other}/storage/v1/upload/resumable"
