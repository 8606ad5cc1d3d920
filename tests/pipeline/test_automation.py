"""Sensor ticks and schedule selection against a real Dagster instance; asset checks failing on bad data."""

import datetime as dt
import logging
import os
import shutil
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from dagster._core.test_utils import create_run_for_test

from heimdex_clip_assets import services
from heimdex_clip_assets.adapters.db import EmbeddingRow, SceneRecord
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.definitions import defs
from heimdex_clip_assets.defs import schedules
from heimdex_clip_assets.defs.resources import ClipInferenceResource, StorageResource, VectorStoreResource
from heimdex_clip_assets.defs.schedules import embedding_backfill_schedule
from heimdex_clip_assets.defs.sensors import inbox_sensor, new_videos_sensor
from heimdex_clip_assets.domain import checks

STORAGE = StorageResource()
RESOURCES = {"db": VectorStoreResource(), "storage": STORAGE, "clip": ClipInferenceResource(storage=STORAGE)}


def _tick(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult | dg.SkipReason:
    """One evaluation of the new-videos sensor, then what the daemon does with it: add the partitions."""
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=RESOURCES) as context:
        result = new_videos_sensor(context)
    if isinstance(result, dg.SensorResult):
        for request in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def _inbox_tick(instance: dg.DagsterInstance) -> dg.RunRequest | dg.SkipReason:
    with dg.build_sensor_context(instance=instance) as context:
        return inbox_sensor(context)


def _register_inbox(instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    return (
        defs().resolve_job_def("register_inbox").execute_in_process(instance=instance, raise_on_error=False)
    )


def _drop(settings: Settings, source: Path, name: str, *, age_s: float = 60) -> Path:
    """Put a file in the inbox as a user would, ``age_s`` seconds ago; returns the inbox."""
    settings.inbox_dir.mkdir(parents=True, exist_ok=True)
    target = settings.inbox_dir / name
    shutil.copy(source, target)
    os.utime(target, (time.time() - age_s,) * 2)
    return settings.inbox_dir


def test_sensor_asks_a_run_to_register_inbox_videos_then_ingests_them_once(
    local_env: Settings, instance: dg.DagsterInstance, sample_video: Path
) -> None:
    inbox = _drop(local_env, sample_video, "clip.mp4")
    (inbox / "notes.txt").write_text("not a video, ignored")

    # The tick only notices the file: registering it (hash, probe, upload) is a run's work.
    assert isinstance(_inbox_tick(instance), dg.RunRequest)
    assert isinstance(_tick(instance, None), dg.SkipReason)
    assert (inbox / "clip.mp4").exists()
    assert _register_inbox(instance).success
    assert isinstance(_inbox_tick(instance), dg.SkipReason)
    assert (inbox / "registered" / "clip.mp4").exists() and (inbox / "notes.txt").exists()

    first = _tick(instance, None)
    assert isinstance(first, dg.SensorResult)
    (request,) = first.run_requests
    video_id = request.partition_key
    assert request.run_key == video_id
    assert instance.get_dynamic_partitions("videos") == [video_id]

    # Same cursor again (a daemon restart replaying the tick): same run key, nothing new.
    replay = _tick(instance, None)
    assert [r.run_key for r in replay.run_requests] == [video_id]
    # The next tick, and the same video dropped again and registered: no new ingest run.
    _drop(local_env, sample_video, "again.mp4")
    assert isinstance(_inbox_tick(instance), dg.RunRequest)
    assert _register_inbox(instance).success
    assert isinstance(_tick(instance, first.cursor), dg.SkipReason)
    assert instance.get_dynamic_partitions("videos") == [video_id]


def test_registration_run_moves_a_bad_file_aside_with_a_warning(
    local_env: Settings, instance: dg.DagsterInstance, corrupt_video: Path
) -> None:
    inbox = _drop(local_env, corrupt_video, "broken.mp4")
    result = _register_inbox(instance)
    assert result.success
    assert "not a video" in (inbox / "rejected" / "broken.mp4.error.txt").read_text()
    warnings = [r.user_message for r in instance.all_logs(result.run_id) if r.level == logging.WARNING]
    assert any("broken.mp4" in m and "not a video" in m for m in warnings), warnings
    assert isinstance(_inbox_tick(instance), dg.SkipReason)  # nothing left to notice


def test_sensor_waits_for_files_still_being_copied(
    local_env: Settings, instance: dg.DagsterInstance, sample_video: Path
) -> None:
    inbox = _drop(local_env, sample_video, "fresh.mp4", age_s=0)
    _drop(local_env, sample_video, ".partial.mp4")
    assert isinstance(_inbox_tick(instance), dg.SkipReason)
    assert (inbox / "fresh.mp4").exists() and (inbox / ".partial.mp4").exists()


def _evaluate(instance: dg.DagsterInstance) -> list[dg.RunRequest] | dg.SkipReason:
    # A `with`: the context opens a DagsterInstance of its own (from the instance's ref), which must be
    # closed here. Left to the garbage collector, its close would reset Dagster's current defs-state
    # storage to a disposed instance's at a random later moment ("undefined DagsterInstance weakref").
    with dg.build_schedule_context(
        instance=instance, resources=RESOURCES, scheduled_execution_time=dt.datetime(2026, 11, 26, 6)
    ) as context:
        return embedding_backfill_schedule(context)


def test_schedule_requests_ranges_with_missing_and_stale_embeddings(
    local_env: Settings, instance: dg.DagsterInstance, sample_video: Path, make_video, register, materialize
) -> None:
    store = services.vector_store(local_env)
    done, stale, missing = (register(p) for p in (sample_video, make_video(scenes=2), make_video(scenes=3)))
    for video_id in (done, stale, missing):
        assert materialize(video_id).success
    store.clear_embeddings(missing)
    store.write_embeddings(
        stale,
        [
            EmbeddingRow(s.index, s.embedding, {**s.metadata, "model_version": "old-v0"})
            for s in store.scenes(stale)
        ],
    )
    register(make_video(scenes=4))  # registered but not partitioned yet: the sensor's, not ours

    (request,) = _evaluate(instance)  # one range holds every partition (HEIMDEX_PARTITIONS_PER_RUN=100)
    keys = instance.get_dynamic_partitions("videos")
    assert (request.tags[ASSET_PARTITION_RANGE_START_TAG], request.tags[ASSET_PARTITION_RANGE_END_TAG]) == (
        keys[0],
        keys[-1],
    )
    result = (
        defs()
        .resolve_job_def("embed_scenes")
        .execute_in_process(instance=instance, tags=request.tags, raise_on_error=False)
    )
    assert result.success
    assert sorted(
        m.partition for m in result.asset_materializations_for_node("scene_clip_embeddings")
    ) == sorted(keys)
    assert isinstance(_evaluate(instance), dg.SkipReason)


def test_schedule_splits_ranges_and_waits_for_its_own_runs(
    local_env: Settings, instance: dg.DagsterInstance, make_video, register, materialize, monkeypatch
) -> None:
    monkeypatch.setenv("CLIP_INFERENCE_BACKEND", "off")
    for n in (2, 3, 4):
        assert materialize(register(make_video(scenes=n))).success
    monkeypatch.setenv("CLIP_INFERENCE_BACKEND", "local")
    monkeypatch.setattr(schedules, "PARTITIONS_PER_RUN", 2)
    requests = _evaluate(instance)
    assert [len(instance.get_dynamic_partitions("videos")), len(requests)] == [3, 2]
    create_run_for_test(
        instance,
        job_name="embed_scenes",
        tags=requests[0].tags,
        status=dg.DagsterRunStatus.STARTED,
    )
    skipped = _evaluate(instance)
    assert isinstance(skipped, dg.SkipReason) and "still going" in str(skipped.skip_message)


def _scene(index: int, vector: np.ndarray | None, version: str = "v1") -> SceneRecord:
    return SceneRecord(
        index=index,
        start_s=0,
        end_s=1,
        thumbnail_url="http://storage.test/storage/v1/object/public/videos/o/v/thumbnails/scene_0.jpg",
        embedding=vector,
        metadata={"model_version": version} if vector is not None else None,
    )


def _unit(seed: int, dim: int = 512) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize(
    ("rule", "bad"),
    [
        ("every_scene_embedded", [_scene(0, _unit(0)), _scene(1, None)]),
        ("every_scene_embedded", []),
        ("dimension_matches", [_scene(0, _unit(0)), _scene(1, _unit(1, dim=768))]),
        ("norms_are_unit", [_scene(0, _unit(0)), _scene(1, _unit(1) * 1.5)]),
        ("one_model_version", [_scene(0, _unit(0), "v1"), _scene(1, _unit(1), "v2")]),
    ],
)
def test_each_check_fails_when_it_should(rule: str, bad: list[SceneRecord]) -> None:
    good = [_scene(0, _unit(0)), _scene(1, _unit(1))]
    assert checks.EMBEDDING_CHECKS[rule](good, 512).passed
    outcome = checks.EMBEDDING_CHECKS[rule](bad, 512)
    assert not outcome.passed and outcome.description


def test_asset_check_fails_in_dagster_on_a_bad_vector(
    local_env: Settings, sample_video: Path, register, materialize, instance: dg.DagsterInstance
) -> None:
    video_id = register(sample_video)
    assert materialize(video_id).success
    store = services.vector_store(local_env)
    scene = store.scenes(video_id)[0]
    store.write_embeddings(video_id, [EmbeddingRow(0, scene.embedding * 2, {**scene.metadata})])
    job = (
        defs()
        .resolve_implicit_global_asset_job_def()
        .get_subset(
            asset_check_selection={dg.AssetCheckKey(dg.AssetKey("scene_clip_embeddings"), "norms_are_unit")},
            asset_selection=set(),
        )
    )
    result = job.execute_in_process(partition_key=video_id, instance=instance, raise_on_error=False)
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed and "norm" in evaluation.description
    assert not result.success  # blocking: bad vectors never make a successful run
