"""Memory bench: `heimdex-clip backfill --dry-run` over a library of a million scene rows.

    .venv/bin/python bench/memory.py [--scenes 1000000] [--videos 20000]

Loads ``--scenes`` scene rows (no vectors: all of them need an embedding) across ``--videos`` videos into
the embedded database with COPY, then runs the command as a user would, in its own process, and prints
its wall time and peak RSS (the child's ru_maxrss) against the targets: at most 300 MB, within 10 s.
The scan is counted by the database and streamed per video, so neither grows with the library.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
import uuid

import psycopg
from _common import isolated_home, load_note, timed

from heimdex_clip_assets import services
from heimdex_clip_assets.config import Settings

TARGET_RSS_MB, TARGET_S = 300, 10.0


def load(dsn: str, scenes: int, videos: int) -> None:
    per_video = scenes // videos
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        ids = [uuid.UUID(int=v + 1) for v in range(videos)]
        with cur.copy("COPY videos (id, storage_path, status) FROM STDIN") as copy:
            for video_id in ids:
                copy.write_row((video_id, f"videos/{video_id}/video.mp4", "scenes_ready"))
        columns = 'video_id, "index", start_s, end_s, keyframe_s, thumbnail_path, thumbnail_sha256'
        with cur.copy(f"COPY video_scenes ({columns}) FROM STDIN") as copy:
            for video_id in ids:
                for i in range(per_video):
                    copy.write_row(
                        (video_id, i, i, i + 1, i + 0.5, f"thumbnails/{video_id}/{i}.jpg", f"{video_id}{i}")
                    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=1_000_000)
    parser.add_argument("--videos", type=int, default=20_000)
    args = parser.parse_args()
    with isolated_home():
        settings = Settings.from_env()
        store = services.vector_store(settings)
        _, load_s = timed(lambda: load(store.dsn, args.scenes, args.videos))
        print(f"loaded {args.scenes:,} scene rows in {args.videos:,} videos in {load_s:.1f} s")
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "heimdex_clip_assets.cli", "backfill", "--dry-run"],
            env=os.environ.copy(),
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - started
        rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(done.stdout.splitlines()[0] if done.stdout else done.stderr[-2000:])
        fast, small = wall <= TARGET_S, rss_mb <= TARGET_RSS_MB
        print(
            f"backfill --dry-run: {wall:.1f} s (target <= {TARGET_S:g}: {'ok' if fast else 'MISSED'}), "
            f"peak RSS {rss_mb:.0f} MB (target <= {TARGET_RSS_MB}: {'ok' if small else 'MISSED'})"
        )
        print(load_note())


if __name__ == "__main__":
    main()
