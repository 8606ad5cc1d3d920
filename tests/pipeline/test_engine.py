"""The embedding engine and Dagster backfills at small scale, on real parts: embedded Postgres and storage,
the RunPod client and backend against a loopback endpoint that speaks the worker's contract (with latency),
and the code location loaded by a Dagster code server as `dagster dev` loads it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import dagster as dg
import httpx
import numpy as np
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from heimdex_clip_assets.adapters.clip_backends import LocalBackend
from heimdex_clip_assets.adapters.db import VectorStore
from heimdex_clip_assets.adapters.storage import Storage
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.loopback_worker import LoopbackConfig, serve_in_thread
from heimdex_clip_assets.devservices.synthetic import jpeg
from heimdex_clip_assets.pipeline.embed import EmbeddingEngine, KeyframeEmbedder
from heimdex_clip_contract.errors import ConfigError
from tests.fixtures.engine import add_videos, loopback_backend

SECRET = "engine-test-secret"
LOOPBACK = LoopbackConfig(latency_s=0.3, secret=SECRET)


@pytest.fixture
def loopback() -> Iterator[str]:
    with serve_in_thread(LOOPBACK) as url:
        yield url


def test_jobs_cross_videos_and_overlap(store: VectorStore, storage: Storage, loopback: str) -> None:
    owner = add_videos(store, storage, videos=6, scenes=5)
    engine = EmbeddingEngine(
        store, loopback_backend(loopback, storage, LOOPBACK), batch_size=8, max_in_flight=3
    )
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


def test_jobs_are_signed_while_the_jobs_ahead_are_in_flight(
    store: VectorStore, storage: Storage, loopback: str
) -> None:
    """A job holds its slot only while the endpoint has it: its URLs are signed while the job ahead of it
    is still at the endpoint (one job in flight at a time here), not after that job came back."""
    add_videos(store, storage, videos=1, scenes=4)
    at_endpoint: list[int] = []
    sign = storage.create_signed_urls

    def signing(paths, expires_in=300, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.1)  # a slow storage call; a job sent before it began is at the endpoint by now
        at_endpoint.append(httpx.get(f"{loopback}/stats").json()["in_flight"])
        return sign(paths, expires_in, **kwargs)

    storage.create_signed_urls = signing  # type: ignore[method-assign]
    backend = loopback_backend(loopback, storage, LOOPBACK)
    report = EmbeddingEngine(store, backend, batch_size=1, max_in_flight=1).run(
        store.iter_scenes_to_embed(LOOPBACK.model_version)
    )
    assert (report.embedded, report.failed, report.peak_in_flight) == (4, 0, 1)
    # One signing per job (none signed again: 60 s URLs waited ~0.3 s), each after the first while the
    # job before it was at the endpoint.
    assert at_endpoint == [0, 1, 1, 1]


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


def test_keyframe_embedder_leaves_what_it_cannot_embed_to_the_engine(worker_encoder) -> None:
    """Embedding while detecting never fails the detection: a bad image or a model that cannot load just
    leaves those scenes out of its results (the embedding step does them, and reports why)."""
    import torch

    threads = torch.get_num_threads()
    backend = LocalBackend(worker_encoder, None, model_version="v")
    embedder = KeyframeEmbedder(lambda: backend, batch_size=4, min_batch=2)
    embedder.wait_ready()
    images = [jpeg(seed=0), b"junk", jpeg(seed=1), jpeg(seed=2), jpeg(seed=3)]
    for index, data in enumerate(images):
        embedder.submit(index, data)
    results = embedder.results()
    assert sorted(results) == [0, 2, 3, 4]
    expected = worker_encoder.encode_bytes([images[0]])[0]
    assert float(np.dot(results[0].vector, expected)) >= 0.99999
    assert torch.get_num_threads() == threads  # one core while detecting, all of them again after

    def no_model() -> LocalBackend:
        raise ConfigError("no weights here")

    broken = KeyframeEmbedder(no_model, batch_size=4)
    broken.wait_ready()
    broken.submit(0, jpeg())
    assert broken.results() == {}
