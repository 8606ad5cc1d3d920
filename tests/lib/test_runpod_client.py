"""RunPodClient against RunPod's cloud, stubbed at the HTTP boundary (httpx.MockTransport, async).

The stub answers the way api.runpod.ai does (runsync, status polling, FAILED job shapes, 401/5xx); the
signatures it receives are checked with the worker's own :class:`Verifier`, replay cache included.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from heimdex_clip_assets.adapters.runpod_client import SIGNED_INPUT_MAX_AGE_S, RemoteEmbedding, RunPodClient
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.image_server import ImageServer
from heimdex_clip_assets.devservices.synthetic import jpeg
from heimdex_clip_contract.codec import encode_embedding
from heimdex_clip_contract.errors import (
    AuthError,
    ClipError,
    ImageDownloadError,
    InternalError,
    InvalidImageError,
    ModelMismatchError,
    NetworkError,
    RemoteError,
    RequestTimeoutError,
    encode_job_error,
)
from heimdex_clip_contract.schema import ImageItem, parse_request
from heimdex_clip_contract.signing import Verifier

URL = "https://api.runpod.ai/v2/ep123"
API_KEY = "rpa_SECRET_API_KEY_42"
SECRET = "test-secret-123"
VECTORS = json.loads((Path(__file__).parents[1] / "data" / "hmac_vectors.json").read_text())["vectors"]

Responder = Callable[[httpx.Request], httpx.Response]


class CloudStub:
    """RunPod's cloud API: answers from a script and records what it was sent.

    Each scripted responder gets the request that created the job (the latest ``/runsync``), so a status
    poll can answer with the output for the images that job asked for.
    """

    def __init__(self, *responders: Responder) -> None:
        self.script: Iterator[Responder] = iter(responders)
        self.requests: list[httpx.Request] = []
        self.verifier = Verifier([SECRET])

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.endswith("/runsync"):
            self.job_request = request
        return next(self.script)(self.job_request)

    def inputs(self) -> list[dict[str, Any]]:
        return [json.loads(r.content)["input"] for r in self.requests if r.url.path.endswith("/runsync")]

    def verify(self, job_input: dict[str, Any]) -> None:
        """What the worker does first: refuses a bad, stale or replayed signature."""
        request = parse_request(job_input)
        self.verifier.verify(
            request.message, request.ts, request.sig, version=request.version, nonce=request.nonce
        )


def batch_output(request: httpx.Request, *, dim: int = 512, **fields: Any) -> dict[str, Any]:
    images = json.loads(request.content)["input"]["images"]
    rng = np.random.default_rng(len(images))
    vectors = rng.standard_normal((len(images), dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return {
        "model": "ViT-B-32",
        "pretrained": "openai",
        "model_version": "openai-vit-b-32-v1",
        "dim": dim,
        "encoding": "base64",
        "results": [
            {
                "request_id": img.get("request_id"),
                "embedding": encode_embedding(vector, "base64"),
                "timings": {"download_ms": 5.0, "inference_ms": 2.5, "total_ms": 8.0},
            }
            for img, vector in zip(images, vectors, strict=True)
        ],
        **fields,
    }


def completed(**fields: Any) -> Responder:
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"id": "job-1", "status": "COMPLETED", "output": batch_output(request, **fields)}
        )

    return respond


def reply(http_status: int = 200, /, **body: Any) -> Responder:
    return lambda request: httpx.Response(http_status, json=body)


def make_client(stub: CloudStub, **kwargs: Any) -> RunPodClient:
    options: dict[str, Any] = {
        "api_key": API_KEY,
        "hmac_secret": SECRET,
        "timeout_s": 60.0,
        "max_retries": 3,
        "model_name": "ViT-B-32",
        "dim": 512,
        "model_version": "openai-vit-b-32-v1",
        "transport": httpx.MockTransport(stub),
        "backoff_base_s": 0.001,
        "poll_interval_s": 0.001,
        "poll_max_interval_s": 0.002,
    } | kwargs
    return RunPodClient(URL, **options)


ITEMS = [ImageItem(f"https://h/{i}.jpg", request_id=str(i)) for i in range(3)]


def test_batch_completed_in_one_call() -> None:
    stub = CloudStub(completed())
    with make_client(stub) as client:
        out = client.embed_batch(ITEMS)
    assert len(out) == 3 and all(isinstance(e, RemoteEmbedding) for e in out)
    first = out[0]
    assert isinstance(first, RemoteEmbedding)
    assert first.vector.dtype == np.float32 and first.dim == 512
    assert (first.request_id, first.model_version, first.inference_ms) == ("0", "openai-vit-b-32-v1", 2.5)
    (request,) = stub.requests
    assert request.method == "POST" and str(request.url) == f"{URL}/runsync"
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    job_input = stub.inputs()[0]
    assert job_input["encoding"] == "base64" and job_input["model"] == "ViT-B-32"
    stub.verify(job_input)


def test_an_input_signed_ahead_is_sent_while_fresh() -> None:
    """The engine signs the next job while others are in flight: sent as signed when fresh, signed
    afresh when it waited too long, or when it is not these items' input."""
    stub = CloudStub(completed(), completed(), completed())
    with make_client(stub) as client:
        fresh = client.sign_batch(ITEMS)
        client.embed_batch(ITEMS, signed=fresh)
        client.embed_batch(ITEMS[:2], signed=client.sign_batch(ITEMS))
        signed = client.sign_batch(ITEMS)
        stale = dataclasses.replace(signed, signed_at=signed.signed_at - SIGNED_INPUT_MAX_AGE_S - 1)
        client.embed_batch(ITEMS, signed=stale)
    sent = stub.inputs()
    assert sent[0] == fresh.job_input
    assert len(sent[1]["images"]) == 2
    assert sent[2]["auth"]["nonce"] != stale.job_input["auth"]["nonce"]
    for job_input in sent:
        stub.verify(job_input)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['kind']}-{v['sig'][:8]}")
def test_signing_matches_golden_vectors(vector: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # The client sends single images signed as the guide signs them (version 1) and batches signed
    # whole (version 2, base64); the worker's tests cover the other vectors.
    job = vector.get("input", {})
    if vector["kind"] == "batch" or (vector["kind"] == "request-v2" and job.get("encoding") != "base64"):
        pytest.skip("not a request this client sends")
    monkeypatch.setattr(time, "time", lambda: float(vector["ts"] if "ts" in vector else job["auth"]["ts"]))
    if "auth" in job:
        monkeypatch.setattr(secrets, "token_hex", lambda n: job["auth"]["nonce"])
    stub = CloudStub(reply(200, id="j", status="FAILED", error="stop here"))
    client = make_client(stub, hmac_secret=vector["secret"], max_retries=0, model_name=job.get("model"))
    with pytest.raises(ClipError):
        if vector["kind"] == "request-v2":
            client.embed_batch([ImageItem(i["image_url"], i.get("request_id")) for i in job["images"]])
        else:
            client.embed_one(vector["image_urls"][0])
    sent = stub.inputs()[0]
    if vector["kind"] == "request-v2":
        assert sent == job
    else:
        assert sent["auth"] == {"ts": vector["ts"], "sig": vector["sig"]}


def test_in_queue_is_polled_with_get_until_completed() -> None:
    stub = CloudStub(
        reply(200, id="job-1", status="IN_QUEUE"),
        reply(200, id="job-1", status="IN_PROGRESS"),
        completed(),
    )
    out = make_client(stub).embed_batch(ITEMS)
    assert all(isinstance(e, RemoteEmbedding) for e in out)
    assert [(r.method, r.url.path) for r in stub.requests[1:]] == [("GET", "/v2/ep123/status/job-1")] * 2


def test_status_falls_back_to_post_on_405() -> None:
    stub = CloudStub(
        reply(200, id="job-1", status="IN_QUEUE"), reply(405, detail="Method Not Allowed"), completed()
    )
    make_client(stub).embed_batch(ITEMS)
    assert [r.method for r in stub.requests] == ["POST", "GET", "POST"]


@pytest.mark.parametrize("status", [500, 502, 429])
def test_transient_http_errors_are_retried_with_a_fresh_signature(status: int) -> None:
    stub = CloudStub(reply(status, error="busy"), completed())
    out = make_client(stub).embed_batch(ITEMS)
    assert all(isinstance(e, RemoteEmbedding) for e in out)
    first, second = stub.inputs()
    assert second["auth"]["nonce"] != first["auth"]["nonce"]  # a fresh signature, not a replay
    # Both reach the worker's verifier: the retry must not look like a replay of the first attempt.
    stub.verify(first)
    stub.verify(second)


def test_network_error_is_retried_then_raised() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    stub = CloudStub(*[refuse] * 3)
    with pytest.raises(NetworkError, match=r"^Connection error: Failed to connect to api\.runpod\.ai"):
        make_client(stub, max_retries=2).embed_batch(ITEMS)
    assert len(stub.requests) == 3


def test_our_auth_failure_is_not_retried() -> None:
    error = encode_job_error(AuthError("Authentication failed: bad signature"))["error"]
    stub = CloudStub(reply(200, id="j", status="FAILED", error=error))
    with pytest.raises(AuthError, match="bad signature"):
        make_client(stub).embed_batch(ITEMS)
    assert len(stub.requests) == 1


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_api_key_is_not_retried_and_never_shown(status: int) -> None:
    stub = CloudStub(reply(status, error=f"invalid key {API_KEY}"))
    with pytest.raises(AuthError) as info:
        make_client(stub).embed_batch(ITEMS)
    assert len(stub.requests) == 1
    assert "RUNPOD_API_KEY" in info.value.message
    assert API_KEY not in str(info.value) and SECRET not in str(info.value)


def test_server_error_body_echoing_the_key_is_redacted() -> None:
    stub = CloudStub(reply(404, error=f"no endpoint for {API_KEY} / {SECRET}"))
    with pytest.raises(RemoteError) as info:
        make_client(stub).embed_batch(ITEMS)
    assert API_KEY not in str(info.value) and SECRET not in str(info.value)
    assert len(stub.requests) == 1  # a 404 is a wrong endpoint id, not a blip


def test_job_stuck_in_queue_times_out_with_the_seed_message() -> None:
    stub = CloudStub(*[reply(200, id="job-1", status="IN_QUEUE")] * 2000)
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError, match=r"^Request timeout after 0\.5s \(RUNPOD_TIMEOUT_S covers"):
        make_client(stub, max_retries=1, timeout_s=0.5).embed_batch(ITEMS)
    # One deadline for the whole call: the timed-out job is not sent again past it.
    assert len(stub.inputs()) == 1 and time.monotonic() - started < 1.5


def test_timed_out_job_is_cancelled_once_before_the_retry() -> None:
    jobs = iter(["job-a", "job-b"])
    calls: list[str] = []  # every request but the status polls, in order
    job = ""

    def cloud(request: httpx.Request) -> httpx.Response:
        nonlocal job
        path = request.url.path
        if path.endswith("/runsync"):
            job = next(jobs)
        if "/status/" not in path:
            calls.append(f"{request.method} {path.removeprefix('/v2/ep123')}")
        if "/cancel/" in path:
            return httpx.Response(404, json={"error": "not found"})  # as the local SDK server answers
        return httpx.Response(200, json={"id": job, "status": "IN_QUEUE"})

    client = make_client(CloudStub(), max_retries=1, timeout_s=0.3, transport=httpx.MockTransport(cloud))
    with pytest.raises(RequestTimeoutError, match=r"^Request timeout after 0\.3s"):
        client.embed_batch(ITEMS)
    # The job still pending at the deadline is cancelled exactly once (in the background).
    for _ in range(100):
        if len(calls) == 2:
            break
        time.sleep(0.01)
    assert calls == ["POST /runsync", "POST /cancel/job-a"]


def test_failed_cancel_still_raises_the_timeout() -> None:
    def transport(request: httpx.Request) -> httpx.Response:
        if "/cancel/" in request.url.path:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"id": "job-1", "status": "IN_PROGRESS"})

    client = make_client(CloudStub(), max_retries=0, timeout_s=0.3, transport=httpx.MockTransport(transport))
    with pytest.raises(RequestTimeoutError, match=r"^Request timeout after 0\.3s"):
        client.embed_batch(ITEMS)


def test_http_timeout_is_a_timeout_error() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    stub = CloudStub(slow)
    with pytest.raises(RequestTimeoutError, match=r"^Request timeout after 60\.0s"):
        make_client(stub, max_retries=0).embed_batch(ITEMS)


def test_retryable_failed_job_is_retried_then_given_up() -> None:
    error = json.dumps({"error_type": "RuntimeError", "error_message": "CUDA OOM", "error_traceback": "..."})
    stub = CloudStub(*[reply(200, id="j", status="FAILED", error=error)] * 3)
    with pytest.raises(InternalError, match="Worker raised RuntimeError: CUDA OOM"):
        make_client(stub, max_retries=2).embed_batch(ITEMS)
    assert len(stub.inputs()) == 3


def test_unexpected_dimension_is_a_model_mismatch() -> None:
    stub = CloudStub(completed(dim=768))
    with pytest.raises(ModelMismatchError, match=r"^Unexpected embedding dimension: 768 \(expected 512\)$"):
        make_client(stub).embed_batch(ITEMS)
    assert len(stub.requests) == 1


def test_other_model_version_is_a_model_mismatch() -> None:
    stub = CloudStub(completed(model_version="laion-vit-b-32-v1"))
    with pytest.raises(ModelMismatchError, match="CLIP_MODEL_VERSION") as info:
        make_client(stub).embed_batch(ITEMS)
    assert "CLIP_MODEL_NAME" in info.value.message


def test_malformed_json_is_a_remote_error_not_retried() -> None:
    stub = CloudStub(lambda request: httpx.Response(200, text="<html>bad gateway</html>"))
    with pytest.raises(RemoteError, match="malformed JSON"):
        make_client(stub).embed_batch(ITEMS)
    assert len(stub.requests) == 1


def test_per_image_errors_stay_in_their_slot() -> None:
    def one_bad(request: httpx.Request) -> httpx.Response:
        output = batch_output(request)
        output["results"][1] = {"request_id": "1", "error": InvalidImageError("not a JPEG").to_dict()}
        return httpx.Response(200, json={"id": "j", "status": "COMPLETED", "output": output})

    out = make_client(CloudStub(one_bad)).embed_batch(ITEMS)
    assert isinstance(out[0], RemoteEmbedding) and isinstance(out[2], RemoteEmbedding)
    assert isinstance(out[1], InvalidImageError) and out[1].message == "not a JPEG"


def test_a_refused_url_is_sent_again_freshly_signed_only_where_it_can_be() -> None:
    """The worker marks an expired URL's slot final (the same URL fails again); a caller that can sign
    afresh gets that image retried with a new URL, alone. Without a resign it stays final."""
    expired = ImageDownloadError("Image download failed: HTTP 400 (expired?)", retryable=False)

    def first_expired(request: httpx.Request) -> httpx.Response:
        output = batch_output(request)
        output["results"][1] = {"request_id": "1", "error": expired.to_dict()}
        return httpx.Response(200, json={"id": "j", "status": "COMPLETED", "output": output})

    def resign(items: Sequence[ImageItem]) -> list[ImageItem]:
        return [ImageItem(item.image_url + "?fresh", item.request_id) for item in items]

    stub = CloudStub(first_expired, completed())
    out = make_client(stub).embed_batch(ITEMS, resign=resign)
    assert all(isinstance(r, RemoteEmbedding) for r in out)
    assert [img["image_url"] for img in stub.inputs()[1]["images"]] == ["https://h/1.jpg?fresh"]

    out = make_client(CloudStub(first_expired)).embed_batch(ITEMS)
    assert isinstance(out[1], ImageDownloadError) and not out[1].retryable


def test_embed_one_speaks_the_seed_request() -> None:
    def single(request: httpx.Request) -> httpx.Response:
        job_input = json.loads(request.content)["input"]
        output = {
            "embedding": [512**-0.5] * 512,
            "dim": 512,
            "model": "ViT-B-32",
            "model_version": "openai-vit-b-32-v1",
            "request_id": job_input["request_id"],
            "timings": {"download_ms": 50.0, "inference_ms": 45.0, "total_ms": 234.0},
        }
        return httpx.Response(200, json={"id": "j", "status": "COMPLETED", "output": output})

    stub = CloudStub(single)
    emb = make_client(stub).embed_one("https://h/a.jpg", request_id="scene-5")
    assert emb.request_id == "scene-5" and emb.total_ms == 234.0 and emb.dim == 512
    job_input = stub.inputs()[0]
    assert set(job_input) == {"image_url", "request_id", "normalize", "encoding", "model", "auth"}
    stub.verify(job_input)


def test_from_settings_uses_the_endpoint_settings() -> None:
    settings = Settings.from_env(
        {
            "CLIP_INFERENCE_BACKEND": "runpod",
            "RUNPOD_API_KEY": API_KEY,
            "RUNPOD_CLIP_ENDPOINT_ID": "ep123",
            "EMBEDDING_HMAC_SECRET": SECRET,
            "RUNPOD_TIMEOUT_S": "90",
            "RUNPOD_MAX_RETRIES": "1",
        }
    )
    with RunPodClient.from_settings(settings, dim=512) as client:
        assert (client.url, client.timeout_s, client.max_retries, client.dim) == (URL, 90.0, 1, 512)
        assert client.model_version == settings.clip_model_version


# -------------------------------------------------------------------- the real worker (RunPod SDK local API)
class CountingTransport(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        return await super().handle_async_request(request)


def test_real_worker_single_and_batch(worker_url: str, worker_secret: str, image_server: ImageServer) -> None:
    urls = [image_server.add(f"/client/{i}.jpg", jpeg(96, 64, seed=i)) for i in range(3)]
    with RunPodClient(
        worker_url, api_key=None, hmac_secret=worker_secret, model_name="ViT-B-32", dim=512
    ) as client:
        one = client.embed_one(urls[0], request_id="scene-0")
        batch = client.embed_batch([ImageItem(u, str(i)) for i, u in enumerate(urls)])
    assert one.request_id == "scene-0" and one.dim == 512 and one.total_ms > 0
    first = batch[0]
    assert isinstance(first, RemoteEmbedding) and first.request_id == "0"
    # JSON floats (single) and base64 float32 (batch) carry the same vector.
    assert float(one.vector @ first.vector) == pytest.approx(float(one.vector @ one.vector), rel=1e-5)


def test_real_worker_refuses_a_bad_secret_without_retries(worker_url: str, image_server: ImageServer) -> None:
    url = image_server.add("/client/auth.jpg", jpeg(96, 64, seed=7))
    transport = CountingTransport()
    client = RunPodClient(
        worker_url, api_key=None, hmac_secret="not-the-secret", max_retries=3, transport=transport
    )
    with pytest.raises(AuthError, match="EMBEDDING_HMAC_SECRET") as info:
        client.embed_batch([ImageItem(url, "0")])
    assert transport.calls == 1 and "not-the-secret" not in str(info.value)


def test_many_jobs_a_second_keep_the_clock_ts() -> None:
    """Version-2 requests carry a nonce: their ts is the clock's, however many jobs go out a second
    (a ts bumped per job ran ahead of the clock and out of the worker's auth window)."""
    stub = CloudStub(*[completed()] * 200)
    client = make_client(stub)
    for _ in range(200):
        client.embed_batch(ITEMS)
    assert max(i["auth"]["ts"] for i in stub.inputs()) <= time.time() + 1
    assert len({i["auth"]["nonce"] for i in stub.inputs()}) == 200
