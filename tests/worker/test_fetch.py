"""SSRF-safe downloads against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as AppRoute

from heimdex_clip_assets.devservices.image_server import ImageServer, Route
from heimdex_clip_assets.devservices.net import free_port, serve_in_thread
from heimdex_clip_contract.errors import (
    ClipError,
    ImageDownloadError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidRequestError,
)
from runpod_worker.config import WorkerConfig
from runpod_worker.fetch import FetchPolicy, ImageClient, fetch_image, is_public_address
from runpod_worker.handler import http_fetcher

LOOPBACK_OK = FetchPolicy(allow_private=True, max_bytes=1000, timeout_s=2)


def fetch(url: str, policy: FetchPolicy = LOOPBACK_OK) -> bytes:
    async def run() -> bytes:
        async with ImageClient(policy) as client:
            return await fetch_image(client, url)

    return asyncio.run(run())


def refused(url: str, policy: FetchPolicy = LOOPBACK_OK) -> ClipError:
    with pytest.raises(ClipError) as info:
        fetch(url, policy)
    return info.value


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "172.16.0.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::",
    ],
)
def test_non_public_addresses(ip: str) -> None:
    assert not is_public_address(ip)


def test_public_addresses() -> None:
    assert is_public_address("8.8.8.8") and is_public_address("2606:4700:4700::1111")


def test_download_ok(image_server: ImageServer) -> None:
    assert fetch(image_server.add("/ok.jpg", b"\xff\xd8\xffdata")) == b"\xff\xd8\xffdata"


def test_loopback_refused_unless_allowed(image_server: ImageServer) -> None:
    url = image_server.add("/private.jpg", b"x")
    assert isinstance(refused(url, FetchPolicy()), InvalidRequestError)
    assert isinstance(
        refused(image_server.url("/private.jpg", "localhost"), FetchPolicy()), InvalidRequestError
    )


@pytest.mark.parametrize(
    "url", ["http://169.254.169.254/latest/meta-data/", "http://[::ffff:169.254.169.254]/"]
)
def test_metadata_refused_even_with_private_allowed(url: str) -> None:
    err = refused(url)
    assert isinstance(err, InvalidRequestError) and "non-public" in err.message


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://h/a.jpg", "gopher://h/", "data:image/png;base64,AA"]
)
def test_other_schemes_refused(url: str) -> None:
    assert isinstance(refused(url), InvalidRequestError)


def test_allowlist_checked_on_every_redirect_hop(image_server: ImageServer) -> None:
    policy = FetchPolicy(allow_private=True, host_allowlist=("localhost",))
    target = image_server.add("/target.jpg", b"img")
    hop = Route(status=302, content_type=None, headers={"Location": target})  # 127.0.0.1: off the list
    image_server.add("/hop", hop)
    assert isinstance(refused(image_server.url("/off-list.jpg"), policy), InvalidRequestError)
    err = refused(image_server.url("/hop", "localhost"), policy)
    assert "IMAGE_HOST_ALLOWLIST" in err.message
    image_server.add(
        "/hop-relative", Route(status=301, content_type=None, headers={"Location": "/target.jpg"})
    )
    assert fetch(image_server.url("/hop-relative", "localhost"), policy) == b"img"


def test_redirect_to_metadata_address_refused(image_server: ImageServer) -> None:
    loc = {"Location": "http://169.254.169.254/latest/meta-data/iam"}
    err = refused(image_server.add("/to-metadata", Route(status=307, content_type=None, headers=loc)))
    assert isinstance(err, InvalidRequestError)


def test_redirect_loop_stops(image_server: ImageServer) -> None:
    url = image_server.add("/loop", Route(status=302, content_type=None, headers={"Location": "/loop"}))
    err = refused(url)
    assert isinstance(err, ImageDownloadError) and "redirects" in err.message and not err.retryable


def test_oversize_by_content_length_and_by_stream(image_server: ImageServer) -> None:
    assert isinstance(refused(image_server.add("/big", b"x" * 5000)), ImageTooLargeError)
    streamed = image_server.add("/big-stream", Route(body=b"x" * 50_000, send_length=False))
    assert isinstance(refused(streamed), ImageTooLargeError)
    # Content-Length says 10, the server sends more: never more than the declared bytes. Whether the
    # surplus is seen (a broken answer: a failed download) depends on how it arrives; both are safe.
    lying = image_server.add(
        "/lying", Route(body=b"y" * 50_000, headers={"Content-Length": "10"}, send_length=False)
    )
    for _ in range(5):
        try:
            assert fetch(lying) == b"y" * 10
        except ImageDownloadError as err:
            assert len(err.message) < 200  # aiohttp's own message quotes the surplus: not passed on


def test_non_image_content_type(image_server: ImageServer) -> None:
    err = refused(image_server.add("/page", Route(body=b"<html>", content_type="text/html")))
    assert isinstance(err, InvalidImageError) and "text/html" in err.message


@pytest.mark.parametrize(
    ("status", "retryable"), [(400, False), (403, False), (404, False), (500, True), (503, True)]
)
def test_http_errors(image_server: ImageServer, status: int, retryable: bool) -> None:
    err = refused(image_server.add(f"/status-{status}", Route(status=status, body=b"{}")))
    assert isinstance(err, ImageDownloadError) and err.retryable is retryable and str(status) in err.message


def test_timeout_is_retryable(image_server: ImageServer) -> None:
    url = image_server.add("/slow", Route(body=b"x", delay_s=1.0))
    err = refused(url, FetchPolicy(allow_private=True, timeout_s=0.2))
    assert isinstance(err, ImageDownloadError) and err.retryable and "Timeout" in err.message


def test_connection_refused_is_retryable() -> None:

    err = refused(f"http://127.0.0.1:{free_port()}/a.jpg")
    assert isinstance(err, ImageDownloadError) and err.retryable


def test_clients_share_one_verifying_tls_context() -> None:
    # Loading the CA bundle per client cost ~20 ms on the event loop per job; the shared context must
    # still require a certificate that matches the SNI name (the connection itself is pinned to an IP).
    async def contexts() -> list[ssl.SSLContext]:
        found = []
        for _ in range(2):
            async with ImageClient(LOOPBACK_OK) as client:
                found.append(client.session.connector._ssl)  # type: ignore[union-attr]
        return found

    first, second = asyncio.run(contexts())
    assert first is second
    assert first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname


def test_a_host_is_resolved_once_per_job(monkeypatch: pytest.MonkeyPatch, image_server: ImageServer) -> None:
    """A job's images share a host: its address is looked up and checked once, not per image."""
    import runpod_worker.fetch as fetch_module

    calls = []
    resolve = fetch_module._resolve

    async def counting(host: str, port: int, policy: FetchPolicy) -> str:
        calls.append(host)
        return await resolve(host, port, policy)

    monkeypatch.setattr(fetch_module, "_resolve", counting)
    urls = [image_server.add(f"/same-host-{i}.jpg", b"img") for i in range(8)]
    config = WorkerConfig.from_env(
        {"WORKER_ALLOW_INSECURE_NO_AUTH": "true", "IMAGE_ALLOW_PRIVATE_HOSTS": "true"}
    )
    fetched = asyncio.run(http_fetcher(config)(urls))
    assert [data for data, _ in fetched] == [b"img"] * 8 and calls == ["127.0.0.1"]


def test_a_job_downloads_over_a_few_kept_alive_connections() -> None:
    """IMAGE_DOWNLOAD_CONCURRENCY lanes, each reusing its one connection: 40 images over 4 connections,
    never more than 4 at once, every result in its URL's place."""
    peers: set[tuple[str, int]] = set()
    now = peak = 0

    async def image(request: Request) -> Response:
        nonlocal now, peak
        assert request.client is not None
        peers.add((request.client.host, request.client.port))
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0.01)
        now -= 1
        return Response(request.path_params["name"].encode(), media_type="image/jpeg")

    app = Starlette(routes=[AppRoute("/{name}", image)])
    config = WorkerConfig.from_env(
        {
            "WORKER_ALLOW_INSECURE_NO_AUTH": "true",
            "IMAGE_ALLOW_PRIVATE_HOSTS": "true",
            "IMAGE_DOWNLOAD_CONCURRENCY": "4",
        }
    )
    with serve_in_thread(app) as base:
        fetched = asyncio.run(http_fetcher(config)([f"{base}/img{i}" for i in range(40)]))
    assert [data for data, _ in fetched] == [f"img{i}".encode() for i in range(40)]
    assert len(peers) <= 4 and peak <= 4
