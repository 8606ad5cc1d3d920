"""The worker the seed system's users already run speaks only the guide's single-image request: the
pipeline finds that out on its first job and sends it single images (many in flight); our own worker still
answers that request, so their old client works against ours."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterator

import httpx
import pytest

from heimdex_clip_assets.adapters.db import VectorStore
from heimdex_clip_assets.adapters.storage import Storage
from heimdex_clip_assets.devservices.image_server import ImageServer
from heimdex_clip_assets.devservices.loopback_worker import LoopbackConfig, serve_in_thread
from heimdex_clip_assets.devservices.synthetic import jpeg
from tests.fixtures.engine import add_videos, embed_all, loopback_backend

SECRET = "single-image-test-secret"
GUIDE_WORKER = LoopbackConfig(latency_s=0.05, secret=SECRET, single_only=True)
OUR_WORKER = LoopbackConfig(latency_s=0.05, secret=SECRET)


@pytest.fixture
def guide_worker() -> Iterator[str]:
    with serve_in_thread(GUIDE_WORKER) as url:
        yield url


def test_auto_mode_falls_back_to_single_images_once(
    store: VectorStore, storage: Storage, guide_worker: str
) -> None:
    add_videos(store, storage, videos=2, scenes=5)
    runpod = loopback_backend(guide_worker, storage, GUIDE_WORKER, request_mode="auto")
    report = embed_all(store, runpod, batch_size=4, max_in_flight=2)
    assert (report.embedded, report.failed, runpod.request_mode) == (10, 0, "single")
    stats = httpx.get(f"{guide_worker}/stats").json()
    # One image per job (the probe's included), each image embedded once.
    assert stats["images"] == stats["jobs"] == 10
    assert all(len(job) == 1 for job in stats["recent_request_ids"])


def test_batch_mode_against_the_guide_worker_fails_each_scene_clearly(
    store: VectorStore, storage: Storage, guide_worker: str
) -> None:
    add_videos(store, storage, videos=1, scenes=3)
    runpod = loopback_backend(guide_worker, storage, GUIDE_WORKER, request_mode="batch")
    report = embed_all(store, runpod, batch_size=4, max_in_flight=1)
    assert (report.embedded, report.failed) == (0, 3)
    assert "image_url is required" in report.failures[0][2].message


def test_single_mode_works_against_our_worker_too(store: VectorStore, storage: Storage) -> None:
    add_videos(store, storage, videos=1, scenes=4)
    with serve_in_thread(OUR_WORKER) as url:
        runpod = loopback_backend(url, storage, OUR_WORKER, request_mode="single")
        report = embed_all(store, runpod, batch_size=4, max_in_flight=1)
        assert httpx.get(f"{url}/stats").json()["jobs"] == 4
    assert (report.embedded, report.failed) == (4, 0)


def test_the_guides_own_client_request_against_our_worker(
    worker_url: str, worker_secret: str, image_server: ImageServer
) -> None:
    """Their old client: ``{image_url, request_id, normalize, model, auth: {ts, sig}}`` signed over
    ``image_url|ts``, built by hand here; the answer carries ``embedding``, ``dim`` and ``model``."""
    url = image_server.add("/guide/0.jpg", jpeg(96, 54, seed=1))
    ts = int(time.time())
    sig = hmac.new(worker_secret.encode(), f"{url}|{ts}".encode(), hashlib.sha256).hexdigest()
    job = {"image_url": url, "request_id": "r1", "normalize": True, "model": "ViT-B-32"}
    reply = httpx.post(
        f"{worker_url}/runsync", json={"input": {**job, "auth": {"ts": ts, "sig": sig}}}, timeout=120
    ).json()
    assert reply["status"] == "COMPLETED", reply
    output = reply["output"]
    assert len(output["embedding"]) == output["dim"] == 512 and output["model"] == "ViT-B-32"
