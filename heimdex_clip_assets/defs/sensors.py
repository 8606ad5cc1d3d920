"""Inbox files -> a registration run; new videos -> partitions -> ingest runs."""

import dagster as dg

from heimdex_clip_assets import services
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.pipeline import register

from .assets import ingest_video_job
from .partitions import video_labels, videos_partitions
from .resources import VectorStoreResource
from .schedules import ACTIVE


@dg.op(
    description="Registers the settled video files of the inbox (HEIMDEX_INBOX_DIR): hash, probe, upload, "
    "record; each file moves to registered/, or to rejected/ with its reason (a warning here)."
)
def register_inbox_files(context: dg.OpExecutionContext) -> dg.Output[int]:
    # The services directly, not resources: a job with resources to bind makes Dagster copy the sensor
    # that targets it, and the copy trips a beta-parameter warning in Dagster 1.13.
    settings = Settings.from_env()
    scan = register.scan_inbox(
        settings.inbox_dir,
        store=services.vector_store(settings),
        storage=services.storage(settings),
        owner_id=settings.owner_id,
        settle_s=settings.inbox_settle_s,
    )
    context.log.info(f"Registered {len(scan.registered)} video(s) from {settings.inbox_dir}")
    for name, reason in scan.rejected:
        context.log.warning(f"Moved {name!r} to {settings.inbox_dir / 'rejected'}: {reason}")
    return dg.Output(len(scan.registered), metadata={"rejected": len(scan.rejected)})


@dg.job(description="Registers the inbox's settled video files; the sensor then requests their ingest runs.")
def register_inbox() -> None:
    register_inbox_files()


@dg.sensor(
    job=register_inbox,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests a register_inbox run when settled video files wait in the inbox folder "
    "(HEIMDEX_INBOX_DIR), one at a time. The tick only lists the folder: hashing, probing and uploading "
    "take as long as the files are big, so a run does them (Dagster stops a tick at 60 s).",
)
def inbox_sensor(context: dg.SensorEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    settings = Settings.from_env()
    waiting = register.settled_inbox_files(settings.inbox_dir, settings.inbox_settle_s)
    if not waiting:
        return dg.SkipReason(f"No settled video files in {settings.inbox_dir}")
    active = dg.RunsFilter(job_name=register_inbox.name, statuses=ACTIVE)
    if context.instance.get_runs(filters=active, limit=1):
        return dg.SkipReason("A register_inbox run is still going; it takes the files that wait")
    return dg.RunRequest()


@dg.sensor(
    job=ingest_video_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a partition and requests one ingest run for every video registered since the last "
    "tick (by register_inbox, `add-video` or another system writing the videos table).",
)
def new_videos_sensor(
    context: dg.SensorEvaluationContext, db: VectorStoreResource
) -> dg.SensorResult | dg.SkipReason:
    settings = Settings.from_env()
    store = db.get()
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
