"""The handler end to end on CPU: real encoder, real HTTP image server, real signatures."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from heimdex_clip_assets.devservices.image_server import ImageServer
from heimdex_clip_contract.codec import decode_embedding
from heimdex_clip_contract.schema import ImageItem, build_batch_request, build_single_request
from runpod_worker import handler as worker
from runpod_worker.config import WorkerConfig
from runpod_worker.encoder import ClipEncoder

SECRET = "handler-secret"


@pytest.fixture
def state(worker_encoder: ClipEncoder) -> Iterator[worker.WorkerState]:
    config = WorkerConfig.from_env(
        {
            "EMBEDDING_HMAC_SECRET": SECRET,
            "EMBEDDING_HMAC_SECRET_PREVIOUS": "old-secret",
            "IMAGE_ALLOW_PRIVATE_HOSTS": "true",
        }
    )
    state = worker.WorkerState.create(config, worker_encoder)
    worker.set_state(state)
    yield state


def run(job_input: Any) -> dict[str, Any]:
    return asyncio.run(worker.handler({"id": "job-1", "input": job_input}))


def job_error(output: dict[str, Any]) -> dict[str, Any]:
    assert set(output) == {"error"}, output
    return json.loads(output["error"])


def test_single_image(state: worker.WorkerState, image_server: ImageServer, frame_jpeg: bytes) -> None:
    url = image_server.add("/h/single.jpg", frame_jpeg)
    out = run(build_single_request(url, SECRET, request_id="scene-1", model="ViT-B-32"))
    assert len(out["embedding"]) == out["dim"] == 512
    assert out["model"] == "ViT-B-32" and out["request_id"] == "scene-1" and out["encoding"] == "json"
    assert out["model_version"] == state.encoder.model_version
    assert set(out["timings"]) == {"download_ms", "inference_ms", "total_ms"}


def test_batch_with_one_bad_item(
    state: worker.WorkerState, image_server: ImageServer, frame_jpeg: bytes
) -> None:
    good = image_server.add("/h/b-good.jpg", frame_jpeg)
    bad = image_server.add("/h/b-bad.jpg", b"\xff\xd8\xff not really a jpeg")
    gone = image_server.url("/h/missing.jpg")
    items = [ImageItem(good, "a"), ImageItem(bad, "b"), ImageItem(gone, "c"), ImageItem(good, "d")]
    out = run(build_batch_request(items, SECRET))
    results = out["results"]
    assert [r["request_id"] for r in results] == ["a", "b", "c", "d"]
    first = decode_embedding(results[0]["embedding"], 512)
    assert first == decode_embedding(results[3]["embedding"], 512)
    assert results[1]["error"]["code"] == "invalid_image"
    assert results[2]["error"] == {
        "code": "image_download_failed",
        "message": results[2]["error"]["message"],
        "retryable": False,
    }
    assert set(out["timings"]) == {"download_ms", "inference_ms", "total_ms"}


def test_single_bad_image_fails_the_job(state: worker.WorkerState, image_server: ImageServer) -> None:
    url = image_server.add("/h/text.jpg", b"hello")
    assert job_error(run(build_single_request(url, SECRET)))["code"] == "invalid_image"


def test_rotated_previous_secret_accepted(
    state: worker.WorkerState, image_server: ImageServer, frame_jpeg: bytes
) -> None:
    url = image_server.add("/h/rot.jpg", frame_jpeg)
    assert "embedding" in run(build_single_request(url, "old-secret"))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b.pop("auth"), "missing auth"),
        (lambda b: b["auth"].pop("sig"), "missing signature"),
        (lambda b: b["auth"].update(sig="0" * 64), "bad signature"),
        (lambda b: b.update(image_url=b["image_url"] + "?x=1"), "bad signature"),
    ],
)
def test_auth_failures(state: worker.WorkerState, mutate: Any, match: str) -> None:
    body = build_single_request("https://h.example/a.jpg", SECRET)
    mutate(body)
    err = job_error(run(body))
    assert err["code"] == "auth_failed" and match in err["message"] and not err["retryable"]
    assert SECRET not in json.dumps(err)


@pytest.mark.parametrize("skew", [-500, 500])
def test_stale_or_future_timestamp(state: worker.WorkerState, skew: int) -> None:
    body = build_single_request("https://h.example/a.jpg", SECRET, ts=int(time.time()) + skew)
    assert "window" in job_error(run(body))["message"]


def test_replay_refused(state: worker.WorkerState, image_server: ImageServer, frame_jpeg: bytes) -> None:
    body = build_single_request(image_server.add("/h/replay.jpg", frame_jpeg), SECRET)
    assert "embedding" in run(body)
    assert "replay" in job_error(run(body))["message"]


def test_model_mismatch(state: worker.WorkerState) -> None:
    body = build_single_request("https://h.example/a.jpg", SECRET, model="ViT-L-14")
    assert job_error(run(body))["code"] == "model_mismatch"


def test_ssrf_through_the_handler(worker_encoder: ClipEncoder, image_server: ImageServer) -> None:
    worker.set_state(
        worker.WorkerState.create(WorkerConfig.from_env({"EMBEDDING_HMAC_SECRET": SECRET}), worker_encoder)
    )
    err = job_error(run(build_single_request(image_server.add("/h/x.jpg", b"x"), SECRET)))
    assert err["code"] == "invalid_request" and "non-public" in err["message"]


def test_insecure_dev_mode_skips_auth(
    worker_encoder: ClipEncoder, image_server: ImageServer, frame_jpeg: bytes
) -> None:
    config = WorkerConfig.from_env(
        {"WORKER_ALLOW_INSECURE_NO_AUTH": "true", "IMAGE_ALLOW_PRIVATE_HOSTS": "1"}
    )
    worker.set_state(worker.WorkerState.create(config, worker_encoder))
    body = {"image_url": image_server.add("/h/dev.jpg", frame_jpeg), "auth": {"ts": 0, "sig": "x"}}
    assert len(run(body)["embedding"]) == 512


def test_unexpected_error_leaks_nothing(state: worker.WorkerState) -> None:
    err = job_error(asyncio.run(worker.handler({"id": "j", "input": None})))
    assert err["code"] == "invalid_request" and "Traceback" not in err["message"]
