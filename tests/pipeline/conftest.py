"""Fixtures for running the Dagster code location in-process on the real test services."""

from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest

from heimdex_clip_assets import services
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.definitions import defs
from heimdex_clip_assets.pipeline.register import register_video

Materialize = Callable[..., dg.ExecuteInProcessResult]


@pytest.fixture
def local_env(heimdex_env: Settings, monkeypatch: pytest.MonkeyPatch, clip_checkpoint: Path) -> Settings:
    """The test services + the local backend on the random-init checkpoint (loaded by file path)."""
    monkeypatch.setenv("CLIP_INFERENCE_BACKEND", "local")
    monkeypatch.setenv("CLIP_PRETRAINED", str(clip_checkpoint))
    return Settings.from_env()


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def materialize(instance: dg.DagsterInstance) -> Materialize:
    """Run a job of the code location for one video partition, in this process."""

    def run(video_id: str, job: str = "ingest_video", **kwargs: object) -> dg.ExecuteInProcessResult:
        instance.add_dynamic_partitions("videos", [video_id])
        return (
            defs()
            .resolve_job_def(job)
            .execute_in_process(partition_key=video_id, instance=instance, raise_on_error=False, **kwargs)
        )

    return run


@pytest.fixture
def register(local_env: Settings) -> Callable[[Path], str]:
    def run(path: Path) -> str:
        settings = Settings.from_env()
        return register_video(
            path,
            store=services.vector_store(settings),
            storage=services.storage(settings),
            owner_id=settings.owner_id,
        )

    return run
