"""New videos -> partitions -> runs."""

import dagster as dg

from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.pipeline import register

from .assets import ingest_video_job
from .partitions import videos_partitions
from .resources import StorageResource, VectorStoreResource


@dg.sensor(
    job=ingest_video_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers videos dropped in the inbox folder (HEIMDEX_INBOX_DIR), then adds a partition "
    "and requests one ingest run for every video registered since the last tick.",
)
def new_videos_sensor(
    context: dg.SensorEvaluationContext, db: VectorStoreResource, storage: StorageResource
) -> dg.SensorResult | dg.SkipReason:
    settings = Settings.from_env()
    store = db.get()
    registered = register.scan_inbox(
        settings.inbox_dir, store=store, storage=storage.get(), settle_s=settings.inbox_settle_s
    )
    if registered:
        context.log.info(f"Registered {len(registered)} video(s) from {settings.inbox_dir}")

    # The cursor is the (created_at, id) of the newest video already requested. Runs are keyed by video
    # id, so a tick that is replayed after a daemon restart requests nothing twice.
    new = store.videos_registered_after(context.cursor, limit=settings.sensor_max_runs)
    if not new:
        return dg.SkipReason("No new videos")
    known = set(context.instance.get_dynamic_partitions(videos_partitions.name))
    to_add = [v.id for v in new if v.id not in known]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=v.id, run_key=v.id) for v in new],
        dynamic_partitions_requests=[videos_partitions.build_add_request(to_add)] if to_add else [],
        cursor=new[-1].cursor,
    )
