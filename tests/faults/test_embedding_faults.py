"""Faults on the RunPod path (issue 9.3, 9.4, 9.6), injected at the HTTP and database boundaries.

Real parts throughout: embedded Postgres and storage, the RunPod client and backend, the embedding engine,
and, where a worker is needed, the loopback worker (the worker's contract, with a queue delay, fetching
every signed URL) or a raw socket server that misbehaves on purpose.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from email.message import Message
from typing import Any

import httpx
import numpy as np
import pytest

from heimdex_clip_assets.adapters.clip_backends import RunPodBackend, SceneImage
from heimdex_clip_assets.adapters.db import VectorStore
from heimdex_clip_assets.adapters.runpod_client import RunPodClient
from heimdex_clip_assets.adapters.storage import Storage
from heimdex_clip_assets.devservices.loopback_worker import LoopbackConfig, serve_in_thread
from heimdex_clip_assets.devservices.net import free_port
from heimdex_clip_contract.codec import encode_embedding
from heimdex_clip_contract.errors import ClipError, NetworkError, RequestTimeoutError
from heimdex_clip_contract.schema import ImageItem
from tests.fixtures.engine import add_videos, embed_all
from tests.fixtures.fake_servers import HttpServer, TcpServer

SECRET = "faults-secret"
MODEL = LoopbackConfig()


def _client(url: str, **kwargs: Any) -> RunPodClient:
    options = {"model_name": MODEL.model, "dim": MODEL.dim, "model_version": MODEL.model_version} | kwargs
    return RunPodClient(url, api_key=None, hmac_secret=SECRET, backoff_base_s=0.01, **options)


# ----------------------------------------------------------------------------- 9.3: URLs that expire
def test_each_job_is_signed_right_before_it_is_sent(store: VectorStore, storage: Storage) -> None:
    """2 s URLs, jobs of one image queued 0.4 s each, one at a time: 12 jobs take ~5 s. URLs signed
    once up front (as before) expire for every job after the fifth; signed per job, none does."""
    (video_id,) = set(add_videos(store, storage, 1, 12).values())
    config = LoopbackConfig(latency_s=0.4, secret=SECRET, fetch=True)
    with serve_in_thread(config) as url:
        backend = RunPodBackend(_client(url, max_retries=0), storage, pretrained="x", expires_in=2)
        report = embed_all(store, backend, use_cache=False, batch_size=1, max_in_flight=1)
    assert (report.embedded, report.failed) == (12, 0), report.failure_summary()
    assert all(s.embedding is not None for s in store.scenes(video_id))


def test_a_job_that_waited_long_for_its_slot_is_signed_again(store: VectorStore, storage: Storage) -> None:
    """The engine signs a job while the jobs ahead of it are in flight; if it then waits for its slot
    over a tenth of its URLs' life, the backend signs it again before sending, and only then."""
    (video_id,) = set(add_videos(store, storage, 1, 2).values())
    paths = [storage.object_path(str(s.thumbnail_url)) for s in store.scenes(video_id)]
    signed: list[int] = []
    sign = storage.create_signed_urls

    def counting(paths, expires_in=300, **kwargs):  # type: ignore[no-untyped-def]
        signed.append(len(paths))
        return sign(paths, expires_in, **kwargs)

    storage.create_signed_urls = counting  # type: ignore[method-assign]
    with serve_in_thread(LoopbackConfig(latency_s=0.0, secret=SECRET, fetch=True)) as url:
        backend = RunPodBackend(_client(url, max_retries=0), storage, pretrained="x", expires_in=20)
        images = [SceneImage(key=f"k{i}", storage_path=path) for i, path in enumerate(paths)]
        fresh = backend.prepare(images)
        assert all(not isinstance(r, ClipError) for r in backend.send(fresh)) and signed == [2]
        aged = replace(backend.prepare(images), prepared_at=time.monotonic() - 3)  # 3 s of 20 s
        results = backend.send(aged)
    assert all(not isinstance(r, ClipError) for r in results), results
    assert signed == [2, 2, 2]  # fresh: sent as signed; aged: signed again


def _delay_first_job(upstream: str, delay_s: float) -> HttpServer:
    """A proxy in front of the worker that holds the first job past its URLs' expiry (a long queue)."""
    first = threading.Event()

    def answer(method: str, path: str, headers: Message, body: bytes) -> tuple[int, bytes]:
        if not first.is_set():
            first.set()
            time.sleep(delay_s)
        reply = httpx.post(upstream + path, content=body, timeout=30)
        return reply.status_code, reply.content

    return HttpServer(answer)


def test_expired_url_is_retried_with_a_fresh_one(store: VectorStore, storage: Storage) -> None:
    (video_id,) = set(add_videos(store, storage, 1, 4).values())
    with serve_in_thread(LoopbackConfig(latency_s=0.0, secret=SECRET, fetch=True)) as url:
        proxy = _delay_first_job(url, delay_s=2.5)
        backend = RunPodBackend(_client(proxy.url, max_retries=1), storage, pretrained="x", expires_in=2)
        report = embed_all(store, backend, use_cache=False, batch_size=4, max_in_flight=1)
        proxy.close()
    # The first attempt's URLs expired in the queue (image_download_failed in every slot); the client
    # sent exactly those images again with fresh URLs.
    assert (report.embedded, report.failed, report.jobs) == (4, 0, 1), report.failure_summary()
    assert all(s.embedding is not None for s in store.scenes(video_id))


# ------------------------------------------------------------------------- 9.4: bad vectors from a worker
def _worker(results: Callable[[list[str]], list[dict[str, Any]]]) -> HttpServer:
    """Answers /runsync with what ``results(request_ids)`` returns as the job's results list."""

    def answer(method: str, path: str, headers: Message, body: bytes) -> tuple[int, bytes]:
        ids = [img["request_id"] for img in json.loads(body)["input"]["images"]]
        output = {"dim": MODEL.dim, "model": MODEL.model, "model_version": MODEL.model_version}
        job = {"id": "j", "status": "COMPLETED", "output": output | {"results": results(ids)}}
        return 200, json.dumps(job).encode()

    return HttpServer(answer)


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(MODEL.dim)
    return v / np.linalg.norm(v)


def test_bad_vectors_fail_only_their_scene(store: VectorStore, storage: Storage) -> None:
    (video_id,) = set(add_videos(store, storage, 1, 8).values())
    scene_of = {s.id: s.index for s in store.scenes(video_id)}

    def answer(ids: list[str]) -> list[dict[str, Any]]:
        bad: dict[int, Any] = {
            0: [0.0] * MODEL.dim,  # all zero
            1: [1e30] * MODEL.dim,  # huge, finite
            2: [True] * MODEL.dim,  # not numbers
            3: [1e39] + [0.0] * (MODEL.dim - 1),  # a float64 that overflows float32
        }
        results = [
            {
                "request_id": rid,
                "embedding": bad.get(scene_of[rid], encode_embedding(_unit(scene_of[rid]), "json")),
            }
            for rid in ids
        ]
        # Another order than asked, and a result for a request id that was never sent.
        return [
            *reversed(results),
            {"request_id": "never-sent", "embedding": encode_embedding(_unit(99), "json")},
        ]

    worker = _worker(answer)
    backend = RunPodBackend(_client(worker.url, max_retries=0), storage, pretrained="x", expires_in=60)
    report = embed_all(store, backend, use_cache=False, batch_size=8, max_in_flight=1)
    worker.close()

    assert (report.embedded, report.failed) == (4, 4)
    stored = {s.index: s.embedding for s in store.scenes(video_id)}
    for index in range(4):
        assert stored[index] is None
    for index in range(4, 8):  # matched by request_id, not by position
        assert float(stored[index] @ _unit(index)) == pytest.approx(1.0, abs=1e-5)
    reasons = {index: err.message for _, index, err in report.failures}
    assert "norm 0" in reasons[0] and "norm 2.263e+31" in reasons[1]
    assert "not numbers" in reasons[2] and "out-of-range" in reasons[3]
    assert all(message.count(". ") == 0 for message in reasons.values())  # one sentence each


# ------------------------------------------------------------------------ 9.6: RUNPOD_TIMEOUT_S is a deadline
def _drip(conn: socket.socket) -> None:
    """After the request, a 200 whose body comes one byte every 2 s: no single read ever times out."""
    try:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(500):
            time.sleep(2)
            conn.sendall(b" ")
    except OSError:
        pass


def _hang_up(conn: socket.socket) -> None:
    conn.recv(65536)  # the request, then nothing
    conn.close()


@pytest.fixture
def dripping() -> Iterator[TcpServer]:
    server = TcpServer(_drip)
    yield server
    server.close()


def test_timeout_is_a_deadline_for_the_whole_call(dripping: TcpServer) -> None:
    client = _client(dripping.url, timeout_s=3, max_retries=1)
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError, match=r"^Request timeout after 3s? ?.*RUNPOD_TIMEOUT_S covers"):
        client.embed_batch([ImageItem("http://127.0.0.1/a.jpg", "0")])
    assert time.monotonic() - started < 4.5
    client.close()


def test_a_dropped_connection_is_not_called_a_failure_to_connect() -> None:
    server = TcpServer(_hang_up)
    client = _client(server.url, timeout_s=10, max_retries=1)
    with pytest.raises(NetworkError) as info:
        client.embed_batch([ImageItem("http://127.0.0.1/a.jpg", "0")])
    assert "Failed to connect" not in info.value.message and "closed the connection" in info.value.message
    assert server.connections == 2  # connected both times: the attempt and its one retry
    server.close()

    with pytest.raises(NetworkError, match=r"Failed to connect to 127\.0\.0\.1"):
        _client(f"http://127.0.0.1:{free_port()}", timeout_s=10, max_retries=0).embed_batch(
            [ImageItem("http://127.0.0.1/a.jpg", "0")]
        )
