"""The three CLIP backends behind one interface, with real components: the worker's encoder on the test
checkpoint, the embedded storage server, and (for runpod) RunPod's cloud stubbed at the HTTP boundary.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

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
from heimdex_clip_assets.adapters.db import METADATA_KEYS
from heimdex_clip_assets.adapters.runpod_client import RunPodClient
from heimdex_clip_assets.adapters.storage import Storage
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.synthetic import jpeg
from heimdex_clip_contract.codec import encode_embedding
from heimdex_clip_contract.errors import (
    AuthError,
    ClipError,
    ConfigError,
    InvalidImageError,
    InvalidRequestError,
    NotFoundError,
    RemoteError,
    RequestTimeoutError,
    encode_job_error,
)
from runpod_worker.encoder import ClipEncoder

# The seed system's documented keys, the guide's backend, our extras (METADATA_KEYS), and timings.
META_KEYS = {*METADATA_KEYS, "download_ms", "total_ms"}


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
        storage.upload(f"thumbnails/v1/{i}.jpg", jpeg(96, 64, seed=i), content_type="image/jpeg")
    storage.upload("thumbnails/v1/bad.jpg", b"not a jpeg", content_type="image/jpeg")
    images = [SceneImage(i, storage_path=f"thumbnails/v1/{i}.jpg") for i in range(3)]
    images += [
        SceneImage(3, storage_path="thumbnails/v1/bad.jpg"),
        SceneImage(4, storage_path="thumbnails/v1/missing.jpg"),
        SceneImage(5, data=jpeg(96, 64, seed=0)),
        SceneImage(6),
    ]
    out = LocalBackend(encoder, storage).embed(images)

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
    assert (backend.name, backend.dim, backend.enabled) == ("local", 512, True)


def test_off_backend_is_disabled_and_says_so(clip_checkpoint: Path) -> None:
    backend = make_backend(settings_for("local", clip_checkpoint, CLIP_ENABLED="false"), None)
    assert isinstance(backend, OffBackend) and not backend.enabled and backend.name == "off"
    with pytest.raises(ConfigError, match="CLIP_INFERENCE_BACKEND"):
        backend.embed([SceneImage(0, data=jpeg(96, 64, seed=0))])


# --------------------------------------------------------------------------------- runpod (cloud stub)
@pytest.fixture
def runpod_settings(clip_checkpoint: Path) -> Settings:
    return settings_for(
        "runpod",
        clip_checkpoint,
        RUNPOD_API_KEY="key",
        RUNPOD_CLIP_ENDPOINT_ID="ep",
        EMBEDDING_HMAC_SECRET="s",
        RUNPOD_MAX_RETRIES="0",
    )


def cloud(
    settings: Settings, storage: Storage, respond: Callable[[httpx.Request], httpx.Response]
) -> RunPodBackend:
    client = RunPodClient(
        settings.runpod_url,
        api_key="key",
        hmac_secret="s",
        max_retries=0,
        model_name=settings.clip_model_name,
        dim=512,
        model_version=settings.clip_model_version,
        transport=httpx.MockTransport(respond),
    )
    return RunPodBackend(client, storage, pretrained=settings.clip_pretrained, expires_in=60)


def thumbnails(storage: Storage, n: int) -> list[SceneImage]:
    for i in range(n):
        storage.upload(f"thumbnails/rp/{i}.jpg", jpeg(96, 64, seed=i), content_type="image/jpeg")
    return [SceneImage(i, storage_path=f"thumbnails/rp/{i}.jpg") for i in range(n)]


def test_make_backend_runpod(runpod_settings: Settings, storage: Storage) -> None:
    backend = make_backend(runpod_settings, storage)
    assert isinstance(backend, RunPodBackend) and backend.enabled
    assert (backend.model_version, backend.dim) == (runpod_settings.clip_model_version, 512)
    assert runpod_settings.clip_batch_size == 256 and runpod_settings.max_in_flight == 3


def test_runpod_backend_sends_one_signed_job_and_keeps_slots(
    runpod_settings: Settings, storage: Storage
) -> None:
    sent: list[list[str]] = []

    def respond(request: httpx.Request) -> httpx.Response:
        job = json.loads(request.content)["input"]
        sent.append([img["request_id"] for img in job["images"]])
        assert all("/object/sign/" in img["image_url"] for img in job["images"])
        results = [
            {
                "request_id": img["request_id"],
                # Image 1 comes back with norm 2: a vector no normalized request can produce.
                "embedding": encode_embedding(
                    [2.0 if img["request_id"] == "1" else 1.0] + [0.0] * 511, "base64"
                ),
                "timings": {"download_ms": 3.0, "inference_ms": 1.5, "total_ms": 5.0},
            }
            for img in job["images"]
        ]
        output = {"model_version": runpod_settings.clip_model_version, "dim": 512, "results": results}
        return httpx.Response(200, json={"id": "j", "status": "COMPLETED", "output": output})

    images = [*thumbnails(storage, 4), SceneImage(4, storage_path="thumbnails/rp/missing.jpg")]
    out = cloud(runpod_settings, storage, respond).embed(images)
    assert sent == [["0", "1", "2", "3"]]  # one job; the missing thumbnail is never sent
    assert isinstance(out[4], NotFoundError) and "scene_keyframes" in out[4].message
    assert isinstance(out[1], RemoteError) and "norm 2" in out[1].message
    first = out[0]
    assert isinstance(first, EmbeddingResult)
    assert set(first.metadata) >= META_KEYS and first.metadata["backend"] == "runpod"
    assert first.metadata["inference_time_ms"] == 1.5 and first.metadata["batch_size"] == 4


def test_runpod_job_failure_is_raised_for_the_engine(runpod_settings: Settings, storage: Storage) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(RequestTimeoutError) as info:
        cloud(runpod_settings, storage, slow).embed(thumbnails(storage, 2))
    assert log_result(5, "runpod", info.value).splitlines()[1] == "Scene 5: CLIP embedding failed: Timeout"
    assert log_result(5, "runpod", info.value).startswith(
        "Scene 5: RunPod timeout: Request timeout after 60.0s"
    )


def test_runpod_auth_failure_stops_the_run(runpod_settings: Settings, storage: Storage) -> None:
    error = encode_job_error(AuthError("Authentication failed: bad signature"))["error"]
    backend = cloud(
        runpod_settings,
        storage,
        lambda request: httpx.Response(200, json={"id": "j", "status": "FAILED", "error": error}),
    )
    with pytest.raises(AuthError):
        backend.embed(thumbnails(storage, 1))


def test_success_log_line_matches_the_seed() -> None:
    result = EmbeddingResult(
        np.ones(512, dtype=np.float32), {"embed_dim": 512, "inference_time_ms": 45.2, "total_ms": 234.5}
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
        storage.upload(path, jpeg(480, 270, seed=100 + i), content_type="image/jpeg")
    images = [SceneImage(i, storage_path=p) for i, p in enumerate(paths)]
    storage.upload("thumbnails/v2/9.jpg", b"not a jpeg", content_type="image/jpeg")
    broken = SceneImage(9, storage_path="thumbnails/v2/9.jpg")  # the worker fetches it, cannot decode it

    remote = make_backend(settings, storage)
    local = make_backend(settings.replace(clip_backend="local"), storage)
    assert remote.model_version == local.model_version
    remote_out = remote.embed([*images, broken])
    local_out = local.embed(images)

    assert isinstance(remote_out[-1], ClipError) and remote_out[-1].code == "invalid_image"
    for r, loc in zip(remote_out, local_out, strict=False):
        assert isinstance(r, EmbeddingResult) and isinstance(loc, EmbeddingResult)
        assert float(r.vector @ loc.vector) >= 0.999
        assert r.metadata["model_version"] == loc.metadata["model_version"]
