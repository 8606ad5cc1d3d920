"""New videos -> partitions -> runs."""

import dagster as dg

from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.pipeline import register

from .assets import ingest_video_job
from .partitions import video_labels, videos_partitions
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
    scan = register.scan_inbox(
        settings.inbox_dir, store=store, storage=storage.get(), settle_s=settings.inbox_settle_s
    )
    if scan.registered:
        context.log.info(f"Registered {len(scan.registered)} video(s) from {settings.inbox_dir}")
    for name, reason in scan.rejected:
        context.log.warning(f"Moved {name!r} to {settings.inbox_dir / 'rejected'}: {reason}")

    # The cursor is the (created_at, id) of the newest video already requested. Runs are keyed by video
    # id, so a tick that is replayed after a daemon restart requests nothing twice.
    new = store.videos_registered_after(context.cursor, limit=settings.sensor_max_runs)
    if not new:
        return dg.SkipReason("No new videos")
    # A video processed before the sensor saw it (`demo`, `process-video`) needs no run: one would
    # recompute nothing. The cursor moves past it all the same.
    done = store.videos_done([v.id for v in new], settings.clip_model_version)
    if done:
        context.log.info(f"Skipped {len(done)} video(s) already done: {', '.join(sorted(done))}")
    todo = [v for v in new if v.id not in done]
    # Adding a key that exists is a no-op for Dagster: no need to list every partition (~0.3 s per tick
    # at 100,000, bench/partitions.py) to find which of these are new.
    to_add = [v.id for v in new]
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(partition_key=v.id, run_key=v.id, tags=video_labels(store.get_video(v.id)))
            for v in todo
        ],
        dynamic_partitions_requests=[videos_partitions.build_add_request(to_add)] if to_add else [],
        cursor=new[-1].cursor,
        skip_reason=None if todo else f"{len(done)} new video(s), all already done",
    )
