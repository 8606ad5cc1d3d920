"""Partition-count bench: what 10,000 and 100,000 video partitions cost Dagster, on dagster-postgres.

    .venv/bin/python bench/partitions.py [--sizes 10000,100000]

On an instance stored in the embedded Postgres (as `heimdex-clip dev` and production run it), for each
size it prints: the cost of adding partitions (keys/s, in batches of 10,000, and one key alone),
``get_dynamic_partitions`` and ``has_dynamic_partition``, a sensor tick that finds 50 new videos (it adds
their partitions and requests their runs), and a schedule tick over every partition (one range per
HEIMDEX_PARTITIONS_PER_RUN partitions with work).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
import uuid
from collections.abc import Callable

import dagster as dg
from _common import isolated_home, load_note

from heimdex_clip_assets import services
from heimdex_clip_assets.adapters.db import VideoRecord
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.defs.resources import ClipInferenceResource, StorageResource, VectorStoreResource
from heimdex_clip_assets.defs.schedules import embedding_backfill_schedule
from heimdex_clip_assets.defs.sensors import new_videos_sensor

STORAGE = StorageResource()
RESOURCES = {"db": VectorStoreResource(), "storage": STORAGE, "clip": ClipInferenceResource(storage=STORAGE)}
BATCH = 10_000


def median_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with isolated_home():
        settings = Settings.from_env()
        store = services.vector_store(settings)
        services.storage(settings)
        url = services.dagster_storage_url(settings)
        with dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": url}}}) as instance:
            have = 0
            for size in sizes:
                before, t0 = have, time.perf_counter()
                while have < size:
                    n = min(BATCH, size - have)
                    instance.add_dynamic_partitions(
                        "videos", [str(uuid.UUID(int=have + i + 1)) for i in range(n)]
                    )
                    have += n
                add_s = time.perf_counter() - t0
                one_ms = median_ms(lambda: instance.add_dynamic_partitions("videos", [str(uuid.uuid4())]))
                list_ms = median_ms(lambda: instance.get_dynamic_partitions("videos"))
                has_ms = median_ms(lambda: instance.has_dynamic_partition("videos", str(uuid.UUID(int=7))))
                for _ in range(50):  # new videos for the sensor to find
                    video_id = str(uuid.uuid4())
                    store.upsert_video(VideoRecord(id=video_id, storage_path=f"videos/{video_id}/video.mp4"))
                t0 = time.perf_counter()
                with dg.build_sensor_context(instance=instance, resources=RESOURCES) as context:
                    result = new_videos_sensor(context)
                sensor_ms = (time.perf_counter() - t0) * 1000
                assert isinstance(result, dg.SensorResult) and len(result.run_requests) == 50
                t0 = time.perf_counter()
                # Closed by the `with`: the context opens an instance of its own from the ref.
                with dg.build_schedule_context(
                    instance=instance, resources=RESOURCES, scheduled_execution_time=dt.datetime(2026, 1, 1)
                ) as context:
                    embedding_backfill_schedule(context)
                schedule_ms = (time.perf_counter() - t0) * 1000
                total = len(instance.get_dynamic_partitions("videos"))
                print(
                    f"{total:>7,} partitions: added at {(have - before) / add_s:,.0f} keys/s "
                    f"(batches of {BATCH:,}), one key {one_ms:.1f} ms | get_dynamic_partitions "
                    f"{list_ms:.0f} ms | has_dynamic_partition {has_ms:.1f} ms | sensor tick, 50 new "
                    f"videos {sensor_ms:.0f} ms | schedule tick {schedule_ms:.0f} ms"
                )
        print(load_note())


if __name__ == "__main__":
    main()
