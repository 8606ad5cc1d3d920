"""Scheduled backfill of missing or stale-model embeddings, at the embedding engine's speed."""

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from heimdex_clip_assets.config import backfill_cron

from .assets import PARTITIONS_PER_RUN, embed_job
from .partitions import videos_partitions
from .resources import ClipInferenceResource, VectorStoreResource

BACKFILL_TAG = "heimdex/backfill"
ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


@dg.schedule(
    job=embed_job,
    # Read when the code location loads: change HEIMDEX_BACKFILL_CRON and reload to reschedule.
    cron_schedule=backfill_cron(),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Re-embeds every video whose scenes lack an embedding or carry another "
    "CLIP_MODEL_VERSION: one run per range of HEIMDEX_PARTITIONS_PER_RUN videos that has work, all "
    "requested on one tick (the run queue and the clip_inference pool pace them), none while the "
    "previous tick's runs are still going.",
)
def embedding_backfill_schedule(
    context: dg.ScheduleEvaluationContext, db: VectorStoreResource, clip: ClipInferenceResource
) -> list[dg.RunRequest] | dg.SkipReason:
    settings = clip.settings()
    if settings.clip_backend == "off":
        return dg.SkipReason("CLIP is off (CLIP_INFERENCE_BACKEND=off); nothing to backfill")
    version = settings.clip_model_version
    busy = context.instance.get_runs(
        filters=dg.RunsFilter(tags={BACKFILL_TAG: version}, statuses=ACTIVE), limit=1
    )
    if busy:
        return dg.SkipReason(f"The backfill's runs from an earlier tick are still going ({busy[0].run_id})")
    # Listing every partition costs ~0.3 s at 100k (docs/scaling): once per tick, not per video.
    keys = context.instance.get_dynamic_partitions(videos_partitions.name)
    store = db.get()
    tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    requests = []
    for start in range(0, len(keys), PARTITIONS_PER_RUN):
        chunk = keys[start : start + PARTITIONS_PER_RUN]
        if store.videos_needing_embeddings(version, chunk):
            # Partition keys are in the order they were added, so a range is exactly this chunk.
            requests.append(
                dg.RunRequest(
                    run_key=f"backfill:{version}:{tick}:{chunk[0]}",
                    tags={
                        BACKFILL_TAG: version,
                        ASSET_PARTITION_RANGE_START_TAG: chunk[0],
                        ASSET_PARTITION_RANGE_END_TAG: chunk[-1],
                    },
                )
            )
    return requests or dg.SkipReason(f"Every scene has a {version} embedding")
