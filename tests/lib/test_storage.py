"""supabase-py (through ``SupabaseStorage``) against the embedded Supabase-compatible storage server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest

from heimdex_clip_assets.adapters.storage import SupabaseStorage
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.net import answers, wait_until
from heimdex_clip_assets.devservices.storage_server import (
    EmbeddedStorage,
    ensure_storage_server,
    stop_storage_server,
)
from heimdex_clip_assets.services import open_storage
from heimdex_clip_contract.errors import NotFoundError, StorageError

JPEG = b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9"


def api(server: EmbeddedStorage, path: str) -> str:
    return f"{server.url}/storage/v1{path}"


def auth(server: EmbeddedStorage) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.service_key}", "apikey": server.service_key}


def test_upload_download_overwrite(storage: SupabaseStorage) -> None:
    storage.upload("thumbnails/v1/0.jpg", JPEG)
    assert storage.download("thumbnails/v1/0.jpg") == JPEG

    with pytest.raises(StorageError, match="Duplicate") as info:
        storage.upload("thumbnails/v1/0.jpg", b"other", upsert=False)
    assert not info.value.retryable
    assert storage.download("thumbnails/v1/0.jpg") == JPEG

    storage.upload("thumbnails/v1/0.jpg", b"new")  # upsert is the default
    assert storage.download("thumbnails/v1/0.jpg") == b"new"

    with pytest.raises(NotFoundError):
        storage.download("thumbnails/v1/missing.jpg")


def test_exists(storage: SupabaseStorage) -> None:
    for i in range(3):
        storage.upload(f"thumbnails/v1/{i}.jpg", JPEG)
    assert storage.exists("thumbnails/v1/2.jpg")
    assert not storage.exists("thumbnails/v1/9.jpg")
    storage.remove(["thumbnails/v1/2.jpg", "thumbnails/v1/9.jpg"])  # a missing one is skipped
    assert not storage.exists("thumbnails/v1/2.jpg") and storage.exists("thumbnails/v1/1.jpg")


def test_signed_urls_work_without_credentials(storage: SupabaseStorage) -> None:
    storage.upload("thumbnails/v1/0.jpg", JPEG)
    storage.upload("thumbnails/v1/1.jpg", b"one")

    url = storage.create_signed_url("thumbnails/v1/0.jpg", expires_in=60)
    assert url.startswith("http://127.0.0.1:")
    reply = httpx.get(url)  # no auth headers, as the worker fetches it
    assert reply.status_code == 200 and reply.content == JPEG
    assert reply.headers["content-type"] == "image/jpeg"
    # A thumbnail comes from one read, with the headers a streamed file has; a range still works.
    assert reply.headers["content-length"] == str(len(JPEG)) and reply.headers["etag"].startswith('"')
    assert {"last-modified", "accept-ranges"} <= set(reply.headers)
    part = httpx.get(url, headers={"Range": "bytes=2-5"})
    assert part.status_code == 206 and part.content == JPEG[2:6]

    urls = storage.create_signed_urls(["thumbnails/v1/0.jpg", "thumbnails/v1/1.jpg"], expires_in=60)
    assert httpx.get(urls["thumbnails/v1/1.jpg"]).content == b"one"
    with pytest.raises(NotFoundError, match="missing"):
        storage.create_signed_urls(["thumbnails/v1/0.jpg", "thumbnails/v1/nope.jpg"], expires_in=60)
    some = storage.create_signed_urls(["thumbnails/v1/0.jpg", "thumbnails/v1/nope.jpg"], 60, missing_ok=True)
    assert list(some) == ["thumbnails/v1/0.jpg"]
    with pytest.raises(NotFoundError):
        storage.create_signed_url("thumbnails/v1/nope.jpg")


def test_expired_and_tampered_tokens_are_refused(storage: SupabaseStorage) -> None:
    storage.upload("a/0.jpg", JPEG)
    storage.upload("a/1.jpg", b"secret")

    url = storage.create_signed_url("a/0.jpg", expires_in=1)
    time.sleep(2.1)  # JWT exp has one-second resolution
    reply = httpx.get(url)
    assert reply.status_code == 400 and reply.json()["error"] == "InvalidJWT"
    assert reply.json()["message"] == '"exp" claim timestamp check failed'

    url = storage.create_signed_url("a/0.jpg", expires_in=60)
    token = url.split("token=")[1]
    claims = jwt.decode(token, options={"verify_signature": False})
    # The server makes its tokens by hand (a quarter of jwt.encode's cost): still standard HS256 JWTs.
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    assert set(claims) == {"url", "iat", "exp"}
    forged = jwt.encode(
        {**claims, "url": claims["url"].replace("0.jpg", "1.jpg")}, "a-guessed-secret-of-32-bytes-or-more"
    )
    assert httpx.get(url.replace(token, forged)).json()["error"] == "InvalidJWT"
    header, payload, signature = token.split(".")
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    assert httpx.get(url.replace(token, f"{header}.{payload}.{flipped}")).status_code == 400
    # A valid token for one object opens no other.
    other = url.replace("/a/0.jpg?", "/a/1.jpg?")
    assert httpx.get(other).status_code == 400


def test_paths_cannot_leave_the_bucket(storage: SupabaseStorage, storage_server: EmbeddedStorage) -> None:
    with pytest.raises(StorageError, match="dot segments"):
        storage.upload("../escape.jpg", JPEG)  # storage3 refuses before sending
    bucket = storage.bucket
    for raw in (
        "%2E%2E/%2E%2E/escape.jpg",
        "a/%2E%2E/%2E%2E/escape.jpg",
        "a%5Cb.jpg",
        "a%00.jpg",
        "a//b.jpg",
    ):
        reply = httpx.post(
            api(storage_server, f"/object/{bucket}/{raw}"), headers=auth(storage_server), files={"file": JPEG}
        )
        assert reply.status_code == 400, raw
        assert reply.json()["error"] in ("InvalidKey", "InvalidBucketName")
    reply = httpx.get(
        api(storage_server, f"/object/{bucket}/%2E%2E/bucket.json"), headers=auth(storage_server)
    )
    assert reply.status_code == 400


def test_auth_is_required(storage: SupabaseStorage, storage_server: EmbeddedStorage) -> None:
    storage.upload("a/0.jpg", JPEG)
    url = api(storage_server, f"/object/{storage.bucket}/a/0.jpg")
    # As the real server: no token, a wrong one, or only an apikey header is the anonymous role, which
    # sees no private bucket.
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"apikey": storage_server.service_key}):
        reply = httpx.get(url, headers=headers)
        assert reply.status_code == 400 and reply.json()["statusCode"] == "404"
        assert reply.json()["code"] == "NoSuchBucket"
    claims = jwt.decode(storage_server.service_key, options={"verify_signature": False})
    assert claims["role"] == "service_role"
    assert httpx.get(url, headers=auth(storage_server)).content == JPEG

    with pytest.raises(StorageError, match="SUPABASE_SERVICE_ROLE_KEY") as info:
        SupabaseStorage(storage_server.url, "wrong-key", storage.bucket)
    assert not info.value.retryable


def test_unreachable_server_is_retryable() -> None:
    with pytest.raises(StorageError, match="SUPABASE_URL") as info:
        SupabaseStorage("http://127.0.0.1:9", "key", "heimdex")
    assert info.value.retryable


def test_open_storage_shares_one_embedded_server(embedded_home: Path) -> None:
    settings = Settings.from_env({"HEIMDEX_HOME": str(embedded_home)})
    try:
        first = open_storage(settings)
        first.upload("x.jpg", JPEG)
        # Another process's view: the same running server, found through the state file.
        assert ensure_storage_server(embedded_home) == ensure_storage_server(embedded_home)
        assert open_storage(settings).download("x.jpg") == JPEG

        stop_storage_server(embedded_home)
        restarted = open_storage(settings)  # dead server: a new one, same keys and objects
        assert restarted.download("x.jpg") == JPEG
    finally:
        stop_storage_server(embedded_home)


def test_stop_twice_never_signals_a_recycled_pid(embedded_home: Path) -> None:
    server = ensure_storage_server(embedded_home)
    state_file = embedded_home / "storage" / "server.json"
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stop_storage_server(embedded_home)
        assert json.loads(state_file.read_text())["pid"] == 0
        # The recorded pid now names an unrelated process (pid reuse, a reboot) and nothing answers at
        # the recorded URL: stopping again, twice, must leave that process alone.
        stale = {**json.loads(state_file.read_text()), "pid": decoy.pid, "url": server.url}
        status = f"{server.url}/storage/v1/status"
        wait_until("the stopped server gone", lambda: not answers(status, any_status=True), timeout_s=10)
        state_file.write_text(json.dumps(stale))
        stop_storage_server(embedded_home)
        stop_storage_server(embedded_home)
        assert decoy.poll() is None
        saved = json.loads(state_file.read_text())
        assert saved["pid"] == 0 and saved["service_key"] == server.service_key
    finally:
        decoy.kill()
        decoy.wait()
        stop_storage_server(embedded_home)


def test_worker_fetches_a_signed_url(storage: SupabaseStorage) -> None:
    fetch = pytest.importorskip("runpod_worker.fetch")
    storage.upload("thumbnails/v1/0.jpg", JPEG)
    url = storage.create_signed_url("thumbnails/v1/0.jpg", expires_in=60)
    policy = fetch.FetchPolicy(allow_private=True)  # the embedded server listens on 127.0.0.1

    async def download() -> bytes:
        async with fetch.ImageClient(policy) as client:
            return await fetch.fetch_image(client, url)

    assert asyncio.run(download()) == JPEG


def test_download_to_streams_into_a_file_and_maps_errors(storage: SupabaseStorage, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 20_000  # 5 MB, several chunks
    source = tmp_path / "in.bin"
    source.write_bytes(payload)
    storage.upload("videos/v/video.mp4", source, content_type="video/mp4")  # streamed from the file
    storage.download_to("videos/v/video.mp4", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == payload
    with pytest.raises(NotFoundError):
        storage.download_to("videos/v/missing.mp4", tmp_path / "missing.bin")
