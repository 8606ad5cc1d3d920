"""Issue 9, item 8: the worker's edges, attacked over HTTP and through its process boundary.

The real worker (the RunPod SDK's local API serving ``runpod_worker.handler``, a subprocess) gets
signed requests that are tampered with in flight, replayed, or carry absurd timestamps; a second worker
in this process stands in for another RunPod worker; bad settings are given to the worker's process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from heimdex_clip_assets.devservices.image_server import ImageServer
from heimdex_clip_contract.schema import ImageItem, build_batch_request, build_single_request
from runpod_worker import handler as worker
from runpod_worker.config import WorkerConfig
from runpod_worker.encoder import ClipEncoder

ROOT = Path(__file__).resolve().parents[2]


def runsync(worker_url: str, job_input: Any) -> dict[str, Any]:
    reply = httpx.post(f"{worker_url}/runsync", json={"input": job_input}, timeout=60).json()
    if reply["status"] == "FAILED":
        return {"error": json.loads(reply["error"])}
    assert reply["status"] == "COMPLETED", reply
    return reply["output"]


def in_process_worker(encoder: ClipEncoder, **env: str) -> Callable[[Any], dict[str, Any]]:
    """Another worker process's view: its own state and replay memory, the same handler code."""
    state = worker.WorkerState.create(WorkerConfig.from_env({"EMBEDDING_HMAC_SECRET": "s", **env}), encoder)

    def run(job_input: Any) -> dict[str, Any]:
        worker.set_state(state)
        out = asyncio.run(worker.handler({"id": "job", "input": job_input}))
        return {"error": json.loads(out["error"])} if set(out) == {"error"} else out

    return run


@pytest.mark.parametrize(
    "tamper",
    [
        lambda b: b.update(normalize=False),
        lambda b: b.update(model="ViT-L-14"),
        lambda b: b.update(encoding="json"),
        lambda b: b["images"][0].update(request_id="someone-else"),
        lambda b: b["images"].reverse(),
        lambda b: b.update(extra="added in flight"),
        lambda b: b["auth"].update(nonce="0" * 32),
    ],
    ids=["normalize", "model", "encoding", "request_id", "order", "added-field", "nonce"],
)
def test_every_field_is_signed(
    worker_url: str, worker_secret: str, image_server: ImageServer, frame_jpeg: bytes, tamper: Any
) -> None:
    urls = [image_server.add(f"/edges/t{i}.jpg", frame_jpeg) for i in range(2)]
    body = build_batch_request([ImageItem(u, f"scene-{i}") for i, u in enumerate(urls)], worker_secret)
    tamper(body)
    err = runsync(worker_url, body)["error"]
    assert err["code"] == "auth_failed" and "bad signature" in err["message"]


def test_the_guides_single_image_format_is_still_accepted(
    worker_url: str, worker_secret: str, image_server: ImageServer, frame_jpeg: bytes
) -> None:
    url = image_server.add("/edges/guide.jpg", frame_jpeg)
    body = build_single_request(url, worker_secret, request_id="r", model="ViT-B-32", version=1)
    assert set(body["auth"]) == {"ts", "sig"}
    out = runsync(worker_url, body)
    assert len(out["embedding"]) == 512 and out["request_id"] == "r"


@pytest.mark.parametrize("ts", [10**400, -(10**400), 2**63, -1], ids=["1e400", "-1e400", "2^63", "-1"])
def test_absurd_timestamps_are_auth_failed(worker_url: str, worker_secret: str, ts: int) -> None:
    body = build_single_request("https://example.com/a.jpg", worker_secret, version=1)
    body["auth"]["ts"] = ts
    err = runsync(worker_url, body)["error"]
    assert err == {"code": "auth_failed", "message": err["message"], "retryable": False}
    assert "Unix timestamp" in err["message"]


def test_a_replay_is_refused_per_worker_and_bounded_by_the_window(
    worker_url: str,
    worker_secret: str,
    worker_encoder: ClipEncoder,
    image_server: ImageServer,
    frame_jpeg: bytes,
) -> None:
    """The documented answer (``heimdex_clip_contract.signing``): replay memory is per worker, and the
    auth window bounds what another worker accepts."""
    url = image_server.add("/edges/replay.jpg", frame_jpeg)
    body = build_batch_request([ImageItem(url, "r")], worker_secret)
    assert "results" in runsync(worker_url, body)
    assert "replay" in runsync(worker_url, body)["error"]["message"]

    # A second worker has its own memory: it accepts the copy once, inside its window, then refuses it.
    env = {
        "EMBEDDING_HMAC_SECRET": worker_secret,
        "IMAGE_ALLOW_PRIVATE_HOSTS": "true",
        "AUTH_TIME_WINDOW_SECONDS": "2",
    }
    second = in_process_worker(worker_encoder, **env)
    assert "results" in second(body)
    assert "replay" in second(body)["error"]["message"]
    # Past the window no worker, fresh memory or not, accepts it.
    time.sleep(3.1)
    assert "window" in in_process_worker(worker_encoder, **env)(body)["error"]["message"]


@pytest.mark.parametrize(
    "host",
    [
        "[2002:7f00:1::1]",  # 6to4 of 127.0.0.1
        "[2002:a9fe:a9fe::1]",  # 6to4 of 169.254.169.254 (cloud metadata)
        "[2001:0:4136:e378:8000:63bf:80ff:fffe]",  # Teredo, client 127.0.0.1
        "[64:ff9b::a9fe:a9fe]",  # NAT64 of 169.254.169.254
        "[64:ff9b::a00:1]",  # NAT64 of 10.0.0.1
        "[64:ff9b:1::808:808]",  # local-use NAT64 prefix
        "[::ffff:7f00:1]",  # IPv4-mapped 127.0.0.1
    ],
)
def test_disguised_private_addresses_are_refused(worker_encoder: ClipEncoder, host: str) -> None:
    run = in_process_worker(worker_encoder)
    err = run(build_batch_request([ImageItem(f"http://{host}/a.jpg", "x")], "s"))
    result = err["results"][0]["error"]
    assert result["code"] == "invalid_request" and "non-public" in result["message"]


def test_metadata_behind_6to4_is_refused_even_for_private_hosts(worker_encoder: ClipEncoder) -> None:
    run = in_process_worker(worker_encoder, IMAGE_ALLOW_PRIVATE_HOSTS="true")
    out = run(build_batch_request([ImageItem("http://[2002:a9fe:a9fe::1]/latest/meta-data", "x")], "s"))
    assert out["results"][0]["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IMAGE_DOWNLOAD_TIMEOUT", "nan"),
        ("IMAGE_DOWNLOAD_TIMEOUT", "inf"),
        ("IMAGE_DOWNLOAD_TIMEOUT", "-1"),
        ("MAX_IMAGE_SIZE_BYTES", "0"),
        ("MAX_IMAGE_SIZE_BYTES", "99999999999999999999"),
        ("AUTH_TIME_WINDOW_SECONDS", "86400000"),
        ("IMAGE_DOWNLOAD_CONCURRENCY", "1000000"),
        ("WORKER_CONCURRENCY", "100000"),
        ("AUTH_MIN_SIGNATURE_VERSION", "3"),
    ],
)
def test_numeric_settings_are_finite_and_in_range(name: str, value: str) -> None:
    from heimdex_clip_contract.errors import ConfigError

    with pytest.raises(ConfigError, match=name):
        WorkerConfig.from_env({"EMBEDDING_HMAC_SECRET": "s", name: value})


def test_a_nan_timeout_stops_the_worker_at_start_with_one_sentence() -> None:
    env = {"EMBEDDING_HMAC_SECRET": "s", "IMAGE_DOWNLOAD_TIMEOUT": "nan", "PATH": "/usr/bin:/bin"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "runpod_worker.handler"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "IMAGE_DOWNLOAD_TIMEOUT" in proc.stderr and "Traceback" not in proc.stderr


def test_version_2_can_be_required(worker_encoder: ClipEncoder) -> None:
    run = in_process_worker(worker_encoder, AUTH_MIN_SIGNATURE_VERSION="2")
    err = run(build_single_request("https://example.com/a.jpg", "s", version=1))["error"]
    assert err["code"] == "auth_failed" and "AUTH_MIN_SIGNATURE_VERSION" in err["message"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_the_pipelines_numbers_are_finite_too(value: str) -> None:
    from heimdex_clip_assets.config import Settings
    from heimdex_clip_contract.errors import ConfigError

    for name in ("RUNPOD_TIMEOUT_S", "HEIMDEX_INBOX_SETTLE_S", "SIGNED_URL_EXPIRES_S"):
        with pytest.raises(ConfigError, match=name):  # a RUNPOD_* value only where RunPod is used
            Settings.from_env({name: value}).require_runpod()
