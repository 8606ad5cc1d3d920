"""The three CLIP backends behind one interface, with real components: the worker's encoder on the test
checkpoint, the embedded storage server, and (for runpod) RunPod's cloud stubbed at the HTTP boundary.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from heimdex_clip_assets.adapters.clip_backends import (
    EmbeddingResult,
    LocalBackend,
    OffBackend,
    RunPodBackend,
    SceneImage,
    load_encoder,
    log_result,
    make_backend,
)
from heimdex_clip_assets.adapters.runpod_client import RunPodClient
from heimdex_clip_assets.adapters.storage import Storage
from heimdex_clip_assets.config import Settings
from heimdex_clip_contract.codec import encode_embedding
from heimdex_clip_contract.errors import (
    AuthError,
    ClipError,
    ConfigError,
    InvalidImageError,
    InvalidRequestError,
    RequestTimeoutError,
    encode_job_error,
)
from runpod_worker.encoder import ClipEncoder

META_KEYS = {
    "backend",
    "model_name",
    "pretrained",
    "model_version",
    "dim",
    "inference_time_ms",
    "download_ms",
    "total_ms",
    "batch_size",
}


def jpeg(seed: int, size: tuple[int, int] = (96, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def encoder(clip_checkpoint: Path) -> ClipEncoder:
    return load_encoder("ViT-B-32", str(clip_checkpoint))


def settings_for(backend: str, checkpoint: Path, **env: str) -> Settings:
    return Settings.from_env({"CLIP_INFERENCE_BACKEND": backend, "CLIP_PRETRAINED": str(checkpoint), **env})


# ---------------------------------------------------------------------------------------------- local
def test_encoder_loads_once_per_process(encoder: ClipEncoder, clip_checkpoint: Path) -> None:
    assert load_encoder("ViT-B-32", str(clip_checkpoint)) is encoder


def test_local_backend_embeds_from_storage_and_memory(encoder: ClipEncoder, storage: Storage) -> None:
    for i in range(3):
        storage.upload(f"thumbnails/v1/{i}.jpg", jpeg(i), content_type="image/jpeg")
    storage.upload("thumbnails/v1/bad.jpg", b"not a jpeg", content_type="image/jpeg")
    images = [SceneImage(i, storage_path=f"thumbnails/v1/{i}.jpg") for i in range(3)]
    images += [
        SceneImage(3, storage_path="thumbnails/v1/bad.jpg"),
        SceneImage(4, storage_path="thumbnails/v1/missing.jpg"),
        SceneImage(5, data=jpeg(0)),
        SceneImage(6),
    ]
    out = LocalBackend(encoder, storage, batch_size=2).embed(images)

    assert len(out) == len(images)
    assert [i for i, r in enumerate(out) if isinstance(r, EmbeddingResult)] == [0, 1, 2, 5]
    good = [r for r in out if isinstance(r, EmbeddingResult)]
    for result in good:
        assert result.vector.dtype == np.float32 and result.vector.shape == (512,)
        assert np.linalg.norm(result.vector) == pytest.approx(1.0, abs=1e-5)
        assert set(result.metadata) >= META_KEYS and result.metadata["backend"] == "local"
    # The same bytes from storage and from memory give the same vector.
    assert float(good[0].vector @ good[3].vector) == pytest.approx(1.0, abs=1e-5)
    assert isinstance(out[3], InvalidImageError)
    assert isinstance(out[4], ClipError) and not isinstance(out[4], EmbeddingResult)
    assert isinstance(out[6], InvalidRequestError)


def test_make_backend_local_reuses_the_process_encoder(
    encoder: ClipEncoder, clip_checkpoint: Path, storage: Storage
) -> None:
    backend = make_backend(settings_for("local", clip_checkpoint), storage)
    assert isinstance(backend, LocalBackend) and backend.encoder is encoder
    assert (backend.name, backend.dim, backend.enabled, backend.needs_urls) == ("local", 512, True, False)


def test_off_backend_is_disabled_and_says_so(clip_checkpoint: Path) -> None:
    backend = make_backend(settings_for("local", clip_checkpoint, CLIP_ENABLED="false"), None)
    assert isinstance(backend, OffBackend) and not backend.enabled and backend.name == "off"
    with pytest.raises(ConfigError, match="CLIP_INFERENCE_BACKEND"):
        backend.embed([SceneImage(0, data=jpeg(0))])


# --------------------------------------------------------------------------------- runpod (cloud stub)
@pytest.fixture
def runpod_settings(clip_checkpoint: Path) -> Settings:
    return settings_for(
        "runpod",
        clip_checkpoint,
        RUNPOD_API_KEY="key",
        RUNPOD_CLIP_ENDPOINT_ID="ep",
        EMBEDDING_HMAC_SECRET="s",
        CLIP_BATCH_SIZE="2",
        RUNPOD_MAX_RETRIES="0",
    )


def cloud(settings: Settings, respond: Callable[[httpx.Request], httpx.Response]) -> RunPodBackend:
    client = RunPodClient.from_settings(settings, transport=httpx.MockTransport(respond))
    return RunPodBackend(
        client,
        pretrained=settings.clip_pretrained,
        batch_size=settings.clip_batch_size,
    )


def test_make_backend_runpod(runpod_settings: Settings) -> None:
    backend = make_backend(runpod_settings, None)
    assert isinstance(backend, RunPodBackend) and backend.needs_urls and backend.enabled
    assert (backend.model_version, backend.dim) == (runpod_settings.clip_model_version, 512)


def test_runpod_backend_batches_and_keeps_slots(runpod_settings: Settings) -> None:
    sent: list[list[str]] = []

    def respond(request: httpx.Request) -> httpx.Response:
        job = json.loads(request.content)["input"]
        sent.append([img["request_id"] for img in job["images"]])
        results = [
            {
                "request_id": img["request_id"],
                "embedding": encode_embedding([2.0] + [0.0] * 511, "base64"),
                "timings": {"download_ms": 3.0, "inference_ms": 1.5, "total_ms": 5.0},
            }
            for img in job["images"]
        ]
        output = {"model_version": runpod_settings.clip_model_version, "dim": 512, "results": results}
        return httpx.Response(200, json={"id": "j", "status": "COMPLETED", "output": output})

    images = [SceneImage(i, url=f"https://h/{i}.jpg") for i in range(5)] + [SceneImage(5)]
    out = cloud(runpod_settings, respond).embed(images)
    assert sent == [["0", "1"], ["2", "3"], ["4"]]
    assert isinstance(out[5], InvalidRequestError)
    first = out[0]
    assert isinstance(first, EmbeddingResult)
    assert float(first.vector[0]) == pytest.approx(1.0)  # made unit length whatever the worker sent
    assert set(first.metadata) >= META_KEYS and first.metadata["backend"] == "runpod"
    assert first.metadata["inference_time_ms"] == 1.5 and first.metadata["batch_size"] == 2


def test_runpod_batch_failure_lands_in_every_slot(runpod_settings: Settings) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    out = cloud(runpod_settings, slow).embed([SceneImage(i, url="https://h/a") for i in range(2)])
    assert all(isinstance(r, RequestTimeoutError) for r in out)
    assert log_result(5, "runpod", out[0]).splitlines() == [
        "Scene 5: RunPod timeout: Request timeout after 60.0s",
        "Scene 5: CLIP embedding failed: Timeout",
    ]


def test_runpod_auth_failure_stops_the_run(runpod_settings: Settings) -> None:
    error = encode_job_error(AuthError("Authentication failed: bad signature"))["error"]
    backend = cloud(
        runpod_settings,
        lambda request: httpx.Response(200, json={"id": "j", "status": "FAILED", "error": error}),
    )
    with pytest.raises(AuthError):
        backend.embed([SceneImage(0, url="https://h/a")])


def test_success_log_line_matches_the_seed() -> None:
    result = EmbeddingResult(
        np.ones(512, dtype=np.float32), {"dim": 512, "inference_time_ms": 45.2, "total_ms": 234.5}
    )
    assert log_result(5, "runpod", result) == (
        "Scene 5: RunPod CLIP embedding generated (dim=512, inference=45.2ms, total=234.5ms)"
    )


# -------------------------------------------------------------------- the real worker (RunPod SDK local API)
def test_runpod_and_local_backends_agree_through_the_real_worker(
    worker_url: str, worker_secret: str, clip_checkpoint: Path, storage: Storage
) -> None:
    settings = settings_for(
        "runpod", clip_checkpoint, RUNPOD_CLIP_ENDPOINT_URL=worker_url, EMBEDDING_HMAC_SECRET=worker_secret
    )
    paths = [f"thumbnails/v2/{i}.jpg" for i in range(4)]
    for i, path in enumerate(paths):
        storage.upload(path, jpeg(100 + i, size=(480, 270)), content_type="image/jpeg")
    images = [
        SceneImage(i, storage_path=p, url=storage.create_signed_url(p, 300)) for i, p in enumerate(paths)
    ]
    tampered = SceneImage(  # a token signed for another path: the worker cannot fetch it
        9, url=storage.create_signed_url("thumbnails/v2/0.jpg", 300).replace("/0.jpg", "/9.jpg")
    )

    remote = make_backend(settings, storage)
    local = make_backend(settings.replace(clip_backend="local"), storage)
    assert remote.model_version == local.model_version
    remote_out = remote.embed([*images, tampered])
    local_out = local.embed(images)

    assert isinstance(remote_out[-1], ClipError) and remote_out[-1].code == "image_download_failed"
    for r, loc in zip(remote_out, local_out, strict=False):
        assert isinstance(r, EmbeddingResult) and isinstance(loc, EmbeddingResult)
        assert float(r.vector @ loc.vector) >= 0.999
        assert r.metadata["model_version"] == loc.metadata["model_version"]
