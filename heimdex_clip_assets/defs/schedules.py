"""Scheduled backfill of missing or stale-model embeddings."""

import dagster as dg

from heimdex_clip_assets.config import Settings

from .assets import embed_job
from .partitions import videos_partitions
from .resources import ClipInferenceResource, VectorStoreResource


@dg.schedule(
    job=embed_job,
    # Read when the code location loads: change HEIMDEX_BACKFILL_CRON and reload to reschedule.
    cron_schedule=Settings.from_env().backfill_cron,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Re-embeds videos whose scenes lack an embedding or carry another CLIP_MODEL_VERSION, "
    "at most HEIMDEX_BACKFILL_MAX_RUNS videos per tick.",
)
def embedding_backfill_schedule(
    context: dg.ScheduleEvaluationContext, db: VectorStoreResource, clip: ClipInferenceResource
) -> list[dg.RunRequest] | dg.SkipReason:
    settings = clip.settings()
    if settings.clip_backend == "off":
        return dg.SkipReason("CLIP is off (CLIP_INFERENCE_BACKEND=off); nothing to backfill")
    known = set(context.instance.get_dynamic_partitions(videos_partitions.name))
    # Ask for more than the cap: videos not yet partitioned are the sensor's, not ours.
    candidates = db.get().videos_needing_embeddings(
        settings.clip_model_version, limit=settings.backfill_max_runs * 4
    )
    video_ids = [v for v in candidates if v in known][: settings.backfill_max_runs]
    if not video_ids:
        return dg.SkipReason(f"Every scene has a {settings.clip_model_version} embedding")
    tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    return [
        dg.RunRequest(
            partition_key=video_id,
            run_key=f"backfill:{video_id}:{settings.clip_model_version}:{tick}",
            tags={"heimdex/backfill": settings.clip_model_version},
        )
        for video_id in video_ids
    ]
