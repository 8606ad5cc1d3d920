"""The embedding engine and Dagster backfills at small scale, on real parts: embedded Postgres and storage,
the RunPod client and backend against a loopback endpoint that speaks the worker's contract (with latency),
and the code location loaded by a Dagster code server as `dagster dev` loads it.
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator

import dagster as dg
import httpx
import numpy as np
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from PIL import Image

from heimdex_clip_assets.adapters.clip_backends import RunPodBackend
from heimdex_clip_assets.adapters.db import SceneRecord, VectorStore, VideoRecord
from heimdex_clip_assets.adapters.runpod_client import RunPodClient
from heimdex_clip_assets.adapters.storage import Storage
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.loopback_worker import LoopbackConfig, serve_in_thread
from heimdex_clip_assets.pipeline.embed import EmbeddingEngine
from tests.fixtures.rows import OWNER

SECRET = "engine-test-secret"
LOOPBACK = LoopbackConfig(latency_s=0.3, secret=SECRET)


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def add_videos(store: VectorStore, storage: Storage, videos: int, scenes: int) -> dict[str, str]:
    """``videos`` videos of ``scenes`` scenes each, thumbnails in storage; returns scene id -> video id."""
    owner = {}
    for v in range(videos):
        video_id = str(uuid.uuid4())
        store.ensure_owner(OWNER)
        path = f"{OWNER}/{video_id}/source.mp4"
        store.add_video(VideoRecord(id=video_id, owner_id=OWNER, storage_path=path))
        records = []
        for i in range(scenes):
            path = f"{OWNER}/{video_id}/thumbnails/scene_{i}.jpg"
            storage.upload(path, _jpeg(v * 100 + i), content_type="image/jpeg")
            records.append(SceneRecord(i, i, i + 1, storage.public_url(path), i + 0.5, f"sha-{video_id}-{i}"))
        store.insert_scenes(video_id, records)
        owner |= {s.id: video_id for s in store.scenes(video_id)}
    return owner


@pytest.fixture
def loopback() -> Iterator[str]:
    with serve_in_thread(LOOPBACK) as url:
        yield url


def runpod_backend(url: str, storage: Storage) -> RunPodBackend:
    client = RunPodClient(
        url,
        api_key=None,
        hmac_secret=SECRET,
        model_name=LOOPBACK.model,
        dim=LOOPBACK.dim,
        model_version=LOOPBACK.model_version,
    )
    return RunPodBackend(client, storage, pretrained=LOOPBACK.pretrained, expires_in=60)


def test_jobs_cross_videos_and_overlap(store: VectorStore, storage: Storage, loopback: str) -> None:
    owner = add_videos(store, storage, videos=6, scenes=5)
    engine = EmbeddingEngine(store, runpod_backend(loopback, storage), batch_size=8, max_in_flight=3)
    report = engine.run(store.iter_scenes_to_embed(LOOPBACK.model_version, page_size=7))
    stats = httpx.get(f"{loopback}/stats").json()

    assert (report.embedded, report.failed, report.jobs) == (30, 0, 4)  # 8 + 8 + 8 + 6
    jobs = stats["recent_request_ids"]
    assert sorted(len(j) for j in jobs) == [6, 8, 8, 8]
    # Jobs carry several videos' scenes (5 scenes per video, 8 per job).
    assert all(len({owner[rid] for rid in job}) >= 2 for job in jobs)
    # Jobs overlap, up to the limit and no further.
    assert stats["max_in_flight"] == report.peak_in_flight == 3
    assert all(s.embedding is not None for video in set(owner.values()) for s in store.scenes(video))
    # A second run finds nothing to do.
    again = engine.run(store.iter_scenes_to_embed(LOOPBACK.model_version))
    assert again.scenes == 0 and again.jobs == 0


def test_a_range_run_embeds_every_video_of_the_range(
    heimdex_env: Settings, monkeypatch: pytest.MonkeyPatch, store: VectorStore, loopback: str
) -> None:
    from heimdex_clip_assets import services
    from heimdex_clip_assets.definitions import defs

    monkeypatch.setenv("CLIP_INFERENCE_BACKEND", "runpod")
    monkeypatch.setenv("RUNPOD_CLIP_ENDPOINT_URL", loopback)
    monkeypatch.setenv("EMBEDDING_HMAC_SECRET", SECRET)
    monkeypatch.setenv("CLIP_MODEL_VERSION", LOOPBACK.model_version)
    monkeypatch.setenv("CLIP_BATCH_SIZE", "8")
    settings = Settings.from_env()
    owner = add_videos(store, services.storage(settings), videos=4, scenes=3)
    keys = sorted(set(owner.values()))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("videos", keys)
        result = (
            defs()
            .resolve_job_def("embed_scenes")
            .execute_in_process(
                instance=instance,
                tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]},
                raise_on_error=False,
            )
        )
    assert result.success
    assert (
        sorted(m.partition for m in result.asset_materializations_for_node("scene_clip_embeddings")) == keys
    )
    assert all(e.passed for e in result.get_asset_check_evaluations())
    assert {(store.get_video(k).state, store.get_video(k).status) for k in keys} == {("embedded", "READY")}
    assert httpx.get(f"{loopback}/stats").json()["jobs"] == 2  # 12 scenes of 4 videos, 8 per job


def test_ui_backfill_of_30_partitions_is_a_few_runs(heimdex_env: Settings) -> None:
    """What the UI's "Materialize selected" over 30 partitions does: the GraphQL mutation creates a
    backfill, the backfill daemon turns it into runs."""
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import ModuleTarget
    from dagster._daemon.backfill import execute_backfill_iteration
    from dagster_graphql.client.query import LAUNCH_PARTITION_BACKFILL_MUTATION
    from dagster_graphql.test.utils import execute_dagster_graphql

    keys = [str(uuid.UUID(int=i + 1)) for i in range(30)]
    queued = {"run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}}
    with dg.instance_for_test(overrides=queued) as instance:
        instance.add_dynamic_partitions("videos", keys)
        target = ModuleTarget(
            module_name="heimdex_clip_assets.definitions",
            attribute="defs",
            working_directory=None,
            location_name="heimdex_clip",
        )
        with create_test_daemon_workspace_context(target, instance) as workspace:
            launched = execute_dagster_graphql(
                workspace.create_request_context(),
                LAUNCH_PARTITION_BACKFILL_MUTATION,
                variables={
                    "backfillParams": {
                        "partitionNames": keys,
                        "assetSelection": [
                            {"path": ["scene_keyframes"]},
                            {"path": ["scene_clip_embeddings"]},
                        ],
                    }
                },
            )
            assert launched.data["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess"
            for _ in range(3):
                list(execute_backfill_iteration(workspace, logging.getLogger("backfill")))
        runs = instance.get_runs()
    assert 0 < len(runs) < 30
    covered = {(r.tags[ASSET_PARTITION_RANGE_START_TAG], r.tags[ASSET_PARTITION_RANGE_END_TAG]) for r in runs}
    assert covered == {(keys[0], keys[-1])}  # HEIMDEX_PARTITIONS_PER_RUN=100: one range, both assets
