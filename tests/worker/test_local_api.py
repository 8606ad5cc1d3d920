"""The worker behind the RunPod SDK's own local API (``--rp_serve_api``), spoken to over HTTP."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import httpx
import numpy as np

from heimdex_clip_assets.devservices.image_server import ImageServer
from heimdex_clip_contract.codec import decode_embedding
from heimdex_clip_contract.schema import (
    ImageItem,
    build_batch_request,
    build_single_request,
    build_text_request,
)

if TYPE_CHECKING:
    from runpod_worker.encoder import ClipEncoder


def test_runsync_signed_batch(
    worker_url: str, worker_secret: str, image_server: ImageServer, frame_jpeg: bytes
) -> None:
    urls = [image_server.add(f"/api/{i}.jpg", frame_jpeg) for i in range(3)]
    items = [ImageItem(u, f"s{i}") for i, u in enumerate(urls)] + [
        ImageItem(image_server.url("/api/none"), "gone")
    ]
    reply = httpx.post(
        f"{worker_url}/runsync", json={"input": build_batch_request(items, worker_secret)}, timeout=60
    )
    body = reply.json()
    # The local SDK server awaits an async handler inside /runsync: the answer is final, not IN_QUEUE.
    assert body["status"] == "COMPLETED", body
    results = body["output"]["results"]
    assert [len(decode_embedding(r["embedding"], 512)) for r in results[:3]] == [512] * 3
    assert results[3]["error"]["code"] == "image_download_failed"


def test_runsync_bad_signature_is_failed_job(worker_url: str, image_server: ImageServer) -> None:
    body = build_single_request(image_server.url("/api/0.jpg"), "wrong-secret")
    reply = httpx.post(f"{worker_url}/runsync", json={"input": body}, timeout=60).json()
    assert reply["status"] == "FAILED"
    assert json.loads(reply["error"])["code"] == "auth_failed"


def test_runsync_text_job(worker_url: str, worker_secret: str, worker_encoder: ClipEncoder) -> None:
    """The text tower behind the SDK: one signed job, one vector per text, as the encoder makes them."""
    texts = ["a red car", "a dog on a beach"]
    body = build_text_request(texts, worker_secret, model="ViT-B-32")
    reply = httpx.post(f"{worker_url}/runsync", json={"input": body}, timeout=60).json()
    assert reply["status"] == "COMPLETED", reply
    got = np.array([decode_embedding(e, 512) for e in reply["output"]["embeddings"]])
    np.testing.assert_allclose(got, worker_encoder.encode_text(texts), atol=1e-5)
    assert reply["output"]["model_version"] == worker_encoder.model_version


def test_text_jobs_are_signed_whole(worker_url: str, worker_secret: str) -> None:
    body = build_text_request(["a red car"], worker_secret)
    tampered = {**body, "texts": ["a blue car"]}  # a query swapped in flight
    unsigned_v1 = {"texts": ["a red car"], "auth": {"ts": body["auth"]["ts"], "sig": body["auth"]["sig"]}}
    for job in (tampered, unsigned_v1):
        reply = httpx.post(f"{worker_url}/runsync", json={"input": job}, timeout=60).json()
        assert reply["status"] == "FAILED" and json.loads(reply["error"])["code"] == "auth_failed", reply
