"""Issue 9, item 9 (limits and errors): bad requests at the embedded storage server's HTTP boundary.

Each is answered as Supabase Storage answers (``shared/notes/heimdex-system-facts.md``): HTTP 400 with the
real status in the JSON body, never a 500; uploads are capped and streamed to disk.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from heimdex_clip_assets.adapters.storage import SupabaseStorage
from heimdex_clip_assets.devservices.storage_server import (
    EmbeddedStorage,
    ensure_storage_server,
    stop_storage_server,
    storage_server_pid,
)
from heimdex_clip_contract.errors import StorageError

MiB = 1024 * 1024


def api(server: EmbeddedStorage, path: str) -> str:
    return f"{server.url}/storage/v1{path}"


def auth(server: EmbeddedStorage) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.service_key}"}


def supabase_error(reply: httpx.Response, status: str, code: str) -> dict[str, str]:
    assert reply.status_code == 400, (reply.status_code, reply.text)
    body = reply.json()
    assert set(body) == {"statusCode", "code", "error", "message"}, body
    assert (body["statusCode"], body["code"]) == (status, code), body
    return body


def upload(server: EmbeddedStorage, bucket: str, key: str, data: bytes = b"x", **form: str) -> httpx.Response:
    return httpx.post(
        api(server, f"/object/{bucket}/{key}"),
        headers=auth(server),
        files={"file": ("f", data, "image/jpeg")},
        data=form,
    )


def test_bad_bodies_are_400_invalid_request(
    storage: SupabaseStorage, storage_server: EmbeddedStorage
) -> None:
    url = api(storage_server, f"/object/list/{storage.bucket}")
    headers = {**auth(storage_server), "Content-Type": "application/json"}
    supabase_error(httpx.post(url, headers=headers, content=b"{not json"), "400", "InvalidRequest")
    supabase_error(httpx.post(url, headers=headers, content=b"[1, 2]"), "400", "InvalidRequest")
    body = supabase_error(
        httpx.post(url, headers=headers, json={"prefix": "", "limit": "abc"}), "400", "InvalidRequest"
    )
    assert "limit" in body["message"]
    supabase_error(httpx.post(url, headers=headers, json={"prefix": 7}), "400", "InvalidRequest")
    sign = api(storage_server, f"/object/sign/{storage.bucket}")
    supabase_error(httpx.post(sign, headers=headers, content=b'{"paths": '), "400", "InvalidRequest")
    supabase_error(
        httpx.post(sign, headers=headers, json={"paths": "a", "expiresIn": 60}), "400", "InvalidRequest"
    )
    # The digits-as-a-string form storage3 sends still works.
    assert httpx.post(url, headers=headers, json={"prefix": "", "limit": "10"}).json() == []


def test_keys_no_file_can_hold_are_400_invalid_key(
    storage: SupabaseStorage, storage_server: EmbeddedStorage
) -> None:
    bucket = storage.bucket
    supabase_error(upload(storage_server, bucket, "v/" + "k" * 240 + ".jpg"), "400", "InvalidKey")
    supabase_error(upload(storage_server, bucket, "k" * 1100), "400", "InvalidKey")
    assert upload(storage_server, bucket, "a").status_code == 200
    supabase_error(upload(storage_server, bucket, "a/b"), "400", "InvalidKey")
    assert upload(storage_server, bucket, "c/d").status_code == 200
    supabase_error(upload(storage_server, bucket, "c"), "400", "InvalidKey")
    supabase_error(
        httpx.post(
            api(storage_server, f"/object/{bucket}/c"),
            headers={**auth(storage_server), "x-upsert": "true"},
            files={"file": ("f", b"x", "image/jpeg")},
        ),
        "400",
        "InvalidKey",
    )
    # Through the client: one sentence, not retryable.
    with pytest.raises(StorageError, match="InvalidKey") as info:
        storage.upload("a/b.jpg", b"x")
    assert not info.value.retryable


def test_missing_objects_and_duplicates_answer_like_supabase(
    storage: SupabaseStorage, storage_server: EmbeddedStorage
) -> None:
    bucket = storage.bucket
    missing = httpx.get(api(storage_server, f"/object/{bucket}/nope.jpg"), headers=auth(storage_server))
    assert supabase_error(missing, "404", "NoSuchKey")["error"] == "not_found"
    assert upload(storage_server, bucket, "dup.jpg").status_code == 200
    assert (
        supabase_error(upload(storage_server, bucket, "dup.jpg"), "409", "KeyAlreadyExists")["error"]
        == "Duplicate"
    )
    no_bucket = httpx.get(
        api(storage_server, f"/bucket/nope-{uuid.uuid4().hex[:8]}"), headers=auth(storage_server)
    )
    supabase_error(no_bucket, "404", "NoSuchBucket")


def test_header_injection_through_cache_control_is_refused(
    storage: SupabaseStorage, storage_server: EmbeddedStorage
) -> None:
    bucket = storage.bucket
    reply = upload(storage_server, bucket, "crlf.jpg", cacheControl="3600\r\nX-Injected: yes")
    supabase_error(reply, "400", "InvalidRequest")
    assert upload(storage_server, bucket, "crlf.jpg", cacheControl="60").status_code == 200
    download = httpx.get(api(storage_server, f"/object/{bucket}/crlf.jpg"), headers=auth(storage_server))
    assert download.status_code == 200 and "x-injected" not in download.headers


@pytest.fixture
def small_server(embedded_home: Path) -> Iterator[EmbeddedStorage]:
    """An embedded server capped at 4 MiB (HEIMDEX_STORAGE_FILE_SIZE_LIMIT reaches it the same way)."""
    server = ensure_storage_server(embedded_home, file_size_limit=4 * MiB)
    yield server
    stop_storage_server(embedded_home)


def server_rss(home: Path) -> int:
    pid = json.loads((home / "storage" / "server.json").read_text())["pid"]
    return psutil.Process(pid).memory_info().rss


def test_uploads_are_capped_and_streamed(small_server: EmbeddedStorage, embedded_home: Path) -> None:
    storage = SupabaseStorage(small_server.url, small_server.service_key, "capped")
    storage.upload("ok.bin", b"\0" * (4 * MiB), content_type="application/octet-stream")
    assert len(storage.download("ok.bin")) == 4 * MiB
    with pytest.raises(StorageError, match="HEIMDEX_STORAGE_FILE_SIZE_LIMIT") as info:
        storage.upload("big.bin", b"\0" * (4 * MiB + 1), content_type="application/octet-stream")
    assert not info.value.retryable

    # A chunked body (no Content-Length to refuse up front) of 256 MiB is cut off at the cap; the server
    # never holds it in memory.
    before = server_rss(embedded_home)

    def body() -> Iterator[bytes]:
        boundary = b'--b\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'
        yield boundary
        for _ in range(256):
            yield b"\0" * MiB
        yield b"\r\n--b--\r\n"

    try:
        reply = httpx.post(
            api(small_server, "/object/capped/huge.bin"),
            headers={**auth(small_server), "Content-Type": "multipart/form-data; boundary=b"},
            content=body(),
            timeout=60,
        )
    except httpx.HTTPError:
        pass  # the server may close the connection on a body it refused: either way, nothing stored
    else:
        supabase_error(reply, "413", "EntityTooLarge")
    assert server_rss(embedded_home) - before < 64 * MiB
    assert not storage.exists("huge.bin")


def test_a_server_of_several_processes_serves_as_one_and_stops_whole(tmp_path: Path) -> None:
    """HEIMDEX_STORAGE_WORKERS processes on one port: objects, signed URLs and a resumable upload whose
    chunks may each reach another process (its lock and state are files) all behave as with one; a stop
    ends every process."""
    home = tmp_path / "home"
    server = ensure_storage_server(home, workers=3)
    pid = storage_server_pid(home)
    assert pid is not None
    processes = [psutil.Process(pid), *psutil.Process(pid).children()]
    try:
        assert len(processes) == 3
        storage = SupabaseStorage(server.url, server.service_key, "many")
        paths = [f"a/{i}.jpg" for i in range(24)]
        for path in paths:
            storage.upload(path, path.encode(), content_type="image/jpeg")
        signed = storage.create_signed_urls(paths, 60)
        assert [httpx.get(signed[path]).content for path in paths] == [path.encode() for path in paths]
        video = bytes(range(256)) * (13 * MiB // 256)  # three 6 MiB chunks and a tail, over TUS
        storage.upload("v/source.mp4", video, content_type="video/mp4")
        assert storage.download("v/source.mp4") == video
    finally:
        stop_storage_server(home)
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, alive
