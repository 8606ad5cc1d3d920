"""The code location: every asset, check, job, sensor, schedule and resource of heimdex-clip."""

import dagster as dg

from .defs.assets import (
    embed_job,
    ingest_video_job,
    scene_clip_embeddings,
    scene_keyframes,
    scene_signed_urls,
)
from .defs.checks import embedding_checks
from .defs.resources import ClipInferenceResource, StorageResource, VectorStoreResource
from .defs.schedules import embedding_backfill_schedule
from .defs.sensors import new_videos_sensor

defs = dg.Definitions(
    assets=[scene_keyframes, scene_signed_urls, scene_clip_embeddings],
    asset_checks=embedding_checks,
    jobs=[ingest_video_job, embed_job],
    sensors=[new_videos_sensor],
    schedules=[embedding_backfill_schedule],
    # One video per run and one process per run: the multiprocess executor would add ~3 s per step (7
    # steps) for no gain. Runs for different videos still overlap, up to the run queue's limit.
    executor=dg.in_process_executor,
    resources={
        "db": VectorStoreResource(),
        "storage": StorageResource(),
        "clip": ClipInferenceResource(),
    },
)
