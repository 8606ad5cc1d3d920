"""The assets materialized in-process on embedded Postgres + embedded storage + real CLIP."""

import uuid
from pathlib import Path

import numpy as np
import pytest

from heimdex_clip_assets import services
from heimdex_clip_assets.adapters.db import VideoRecord
from heimdex_clip_assets.cli.common import STEP7_SQL
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.pipeline.keyframes import thumbnail_path
from heimdex_clip_contract.errors import InvalidVideoError


def _checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_local_backend_end_to_end(local_env: Settings, sample_video: Path, register, materialize) -> None:
    video_id = register(sample_video)
    result = materialize(video_id)
    assert result.success
    store = services.vector_store(local_env)
    scenes = store.scenes(video_id)
    assert len(scenes) == 4
    for scene in scenes:
        assert scene.embedding is not None and scene.embedding.shape == (512,)
        assert abs(np.linalg.norm(scene.embedding) - 1) < 1e-3
        assert scene.metadata["backend"] == "local"
        storage = services.storage(local_env)
        assert storage.exists(storage.object_path(scene.thumbnail_url))
    assert _checks(result) == dict.fromkeys(
        ["every_scene_embedded", "dimension_matches", "norms_are_unit", "one_model_version"], True
    )
    mats = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    meta = mats["scene_clip_embeddings"]
    assert meta["computed"].value == 4 and meta["backend"].value == "local"
    assert meta["jobs"].value == 1 and meta["failures"].value == 0
    assert "contact_sheet" in mats["scene_keyframes"]
    rows = store.query(STEP7_SQL, (video_id,))
    assert [r["has_clip"] for r in rows] == [True] * 4


def test_embedding_while_detecting_gives_the_engines_vectors(
    local_env: Settings, sample_video: Path, register, materialize
) -> None:
    """process-video and demo embed each keyframe as its scene ends; the embedding step then has nothing
    left, and the vectors are those the engine makes from the thumbnails in storage."""
    video_id = register(sample_video)
    streaming = {"ops": {"scene_keyframes": {"config": {"embed_while_detecting": True}}}}
    result = materialize(video_id, run_config=streaming)
    assert result.success
    mats = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    assert mats["scene_keyframes"]["embedded_while_detecting"].value == 4
    assert {"model_wait", "embed"} <= set(mats["scene_keyframes"]["stage_seconds"].value)
    assert mats["scene_clip_embeddings"]["computed"].value == 0
    assert all(_checks(result).values())
    store = services.vector_store(local_env)
    early = {s.index: s.embedding for s in store.scenes(video_id)}
    assert len(early) == 4 and all(s.metadata["backend"] == "local" for s in store.scenes(video_id))

    store.clear_embeddings(video_id)  # otherwise the sha256 cache answers instead of the model
    assert materialize(video_id, job="embed_scenes").success
    for scene in store.scenes(video_id):
        assert float(np.dot(scene.embedding, early[scene.index])) >= 0.99999


def test_runpod_backend_matches_local(
    local_env: Settings,
    sample_video: Path,
    register,
    materialize,
    monkeypatch,
    worker_url: str,
    worker_secret: str,
) -> None:
    """The same scenes through the real worker (runpod SDK local API) and in-process: cosine >= 0.999."""
    video_id = register(sample_video)
    assert materialize(video_id).success
    store = services.vector_store(local_env)
    local = {s.index: s.embedding for s in store.scenes(video_id)}

    store.clear_embeddings(video_id)  # otherwise the sha256 cache answers instead of the worker
    monkeypatch.setenv("CLIP_INFERENCE_BACKEND", "runpod")
    monkeypatch.setenv("RUNPOD_CLIP_ENDPOINT_URL", worker_url)
    monkeypatch.setenv("EMBEDDING_HMAC_SECRET", worker_secret)
    result = materialize(video_id, job="embed_scenes")
    assert result.success
    for scene in store.scenes(video_id):
        assert scene.metadata["backend"] == "runpod"
        assert float(np.dot(scene.embedding, local[scene.index])) >= 0.999


def test_off_backend_completes_without_embeddings(
    local_env: Settings, sample_video: Path, register, materialize, monkeypatch
) -> None:
    monkeypatch.setenv("CLIP_INFERENCE_BACKEND", "off")
    video_id = register(sample_video)
    result = materialize(video_id)
    assert result.success
    scenes = services.vector_store(local_env).scenes(video_id)
    assert len(scenes) == 4 and all(s.embedding is None for s in scenes)
    evaluations = result.get_asset_check_evaluations()
    assert all(e.passed and e.metadata["skipped"].value for e in evaluations)


def test_failed_scenes_fail_the_run_and_a_rerun_fills_only_the_gaps(
    local_env: Settings, sample_video: Path, register, materialize
) -> None:
    video_id = register(sample_video)
    store, storage = services.vector_store(local_env), services.storage(local_env)
    assert materialize(video_id).success
    store.clear_embeddings(video_id)
    # Scene 2's thumbnail becomes garbage: the other scenes must still be embedded and stored.
    thumb = thumbnail_path(local_env.owner_id, video_id, 2)
    good = storage.download(thumb)
    storage.upload(thumb, b"not a jpeg", content_type="image/jpeg")
    failed = materialize(video_id, job="embed_scenes")
    assert not failed.success
    failure = next(e for e in failed.all_events if e.is_step_failure)
    assert "scene 2: invalid_image" in failure.step_failure_data.user_failure_data.description
    first = {s.index: s for s in store.scenes(video_id)}
    assert first[2].embedding is None
    assert all(first[i].embedding is not None for i in (0, 1, 3))

    storage.upload(thumb, good, content_type="image/jpeg")
    assert materialize(video_id, job="embed_scenes").success
    second = {s.index: s for s in store.scenes(video_id)}
    assert second[2].embedding is not None
    for i in (0, 1, 3):  # untouched: same vector, same write
        assert second[i].metadata["embedded_at"] == first[i].metadata["embedded_at"]


def test_corrupt_video_fails_clearly_and_writes_nothing(
    local_env: Settings, corrupt_video: Path, empty_video: Path, register
) -> None:
    store = services.vector_store(local_env)
    for bad in (corrupt_video, empty_video):
        with pytest.raises(InvalidVideoError, match=r"check the file|pass a video file"):
            register(bad)
    assert store.query("SELECT id FROM videos") == []


def test_corrupt_video_in_storage_fails_the_keyframes_asset(
    local_env: Settings, materialize, corrupt_video: Path
) -> None:
    """A video that got into storage anyway (e.g. replaced) fails with a clear message; no scenes."""
    store, storage = services.vector_store(local_env), services.storage(local_env)
    video_id = str(uuid.uuid4())
    path = f"{local_env.owner_id}/{video_id}/source.mp4"
    storage.upload(path, corrupt_video.read_bytes(), content_type="video/mp4")
    store.ensure_owner(local_env.owner_id)
    store.add_video(
        VideoRecord(id=video_id, owner_id=local_env.owner_id, storage_path=path, filename="bad.mp4")
    )
    result = materialize(video_id)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "is not a video we can decode" in str(failure.step_failure_data.error)
    assert store.scenes(video_id) == []
    assert (store.get_video(video_id).status, store.get_video(video_id).state) == ("FAILED", "failed")
