"""Memory benches: peak RSS must not grow with the library or with a video's size.

    .venv/bin/python bench/memory.py [backfill] [--scenes 1000000] [--videos 20000]
    .venv/bin/python bench/memory.py video [--large-mb 2048] [--small-mb 20] [--keep-video DIR]

``backfill`` loads ``--scenes`` scene rows (no vectors: all of them need an embedding) across
``--videos`` videos into the embedded database with COPY, then runs `heimdex-clip backfill --dry-run` as
a user would, in its own process, and prints its wall time and peak RSS (the command process's VmHWM) against
the targets: at most 300 MB, within 10 s. The scan is counted by the database and streamed per video, so
neither grows with the library.

``video`` runs `heimdex-clip add-video` and then `process-video` (local CPU backend, random ViT-B-32
weights) on a ``--small-mb`` video and on a ``--large-mb`` one, each command in its own process, and
prints each one's peak RSS (the command process's VmHWM; it runs Dagster in-process) and the difference,
against the target: the large video within 200 MB of the small one. Both videos are generated in a few
seconds: 640x360 raw video (yuv420p, 5 fps) in Matroska, four scenes of repeated noise frames, so the
sizes differ ~100x while the scenes, thumbnails and embeddings are the same and decoding is cheap on a
small machine. The embedded storage server keeps Supabase's 50 MiB standard-upload cap, so the large
video goes up through resumable (TUS) uploads in 6 MiB chunks; the server's own peak RSS is sampled too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from fractions import Fraction
from pathlib import Path

import psutil
import psycopg
from _common import clip_env, isolated_home, load_note, timed

from heimdex_clip_assets import services
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.storage_server import DEFAULT_FILE_SIZE_LIMIT

TARGET_RSS_MB, TARGET_S = 300, 10.0
TARGET_VIDEO_DELTA_MB = 200
MiB = 1024 * 1024


def load(dsn: str, scenes: int, videos: int) -> None:
    """The seed's layout: one owner in ``auth.users``, videos, and scenes whose ``thumbnail_url`` is in
    the public form; no vectors, so every scene needs an embedding."""
    per_video = scenes // videos
    owner = uuid.UUID(int=1 << 64)
    base = "http://127.0.0.1:1/storage/v1/object/public/videos"
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO auth.users (id) VALUES (%s) ON CONFLICT DO NOTHING", (owner,))
        ids = [uuid.UUID(int=v + 1) for v in range(videos)]
        with cur.copy("COPY videos (id, owner_id, storage_path) FROM STDIN") as copy:
            for video_id in ids:
                copy.write_row((video_id, owner, f"{owner}/{video_id}/source.mp4"))
        columns = 'video_id, "index", start_s, end_s, thumbnail_url'
        with cur.copy(f"COPY video_scenes ({columns}) FROM STDIN") as copy:
            for video_id in ids:
                for i in range(per_video):
                    url = f"{base}/{owner}/{video_id}/thumbnails/scene_{i}.jpg"
                    copy.write_row((video_id, i, i, i + 1, url))


def backfill_bench(args: argparse.Namespace) -> None:
    with isolated_home() as home:
        settings = Settings.from_env()
        store = services.vector_store(settings)
        _, load_s = timed(lambda: load(store.dsn, args.scenes, args.videos))
        print(f"loaded {args.scenes:,} scene rows in {args.videos:,} videos in {load_s:.1f} s")
        out, wall, rss_mb = run_command(["backfill", "--dry-run"], home)
        print(out.splitlines()[0] if out else "(no output)")
        fast, small = wall <= TARGET_S, rss_mb <= TARGET_RSS_MB
        print(
            f"backfill --dry-run: {wall:.1f} s (target <= {TARGET_S:g}: {'ok' if fast else 'MISSED'}), "
            f"peak RSS {rss_mb:.0f} MB (target <= {TARGET_RSS_MB}: {'ok' if small else 'MISSED'})"
        )
        print(load_note())


def make_video(path: Path, target_bytes: int, *, scenes: int = 4, size: tuple[int, int] = (640, 360)) -> int:
    """A ``target_bytes`` video of ``scenes`` scenes (a noise frame repeated per scene), written as
    packets: seconds for gigabytes. Returns its frame count."""
    import av
    import numpy as np

    fps = 5
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("rawvideo", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        packets: list[bytes] = []
        for k in range(scenes):
            image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            frame.pts = k
            packets += [bytes(p) for p in stream.encode(frame)]
        packets += [bytes(p) for p in stream.encode(None)]
        frames = max(scenes * 2 * fps, round(target_bytes / len(packets[0])))
        for i in range(frames):
            packet = av.Packet(packets[i * scenes // frames])
            packet.stream, packet.time_base = stream, Fraction(1, fps)
            packet.pts = packet.dts = i
            packet.duration = 1
            out.mux(packet)
    return frames


class PeakRss:
    """Samples a process's RSS every 50 ms while in use; ``.peak`` in bytes."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# The command runs as `heimdex-clip` does, then writes its own peak RSS (VmHWM: this process image's
# high-water mark; ru_maxrss would also count the bench's memory at the fork, carried over the exec).
_WRAPPER = """
import os, sys
from heimdex_clip_assets.cli import main
code = main(sys.argv[1:])
sys.stdout.flush()
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
open(os.environ["MEMORY_BENCH_HWM"], "w").write(hwm.split()[1])
os._exit(code)
"""


def run_command(argv: list[str], folder: Path) -> tuple[str, float, float]:
    """Run `heimdex-clip ARGV` in its own process: (stdout, wall s, its peak RSS in MB)."""
    hwm = folder / "hwm.txt"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *argv],
        env={**os.environ, "COLUMNS": "200", "MEMORY_BENCH_HWM": str(hwm)},
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        output = f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        raise SystemExit(f"heimdex-clip {' '.join(argv)} failed ({done.returncode}):\n{output}")
    return done.stdout, wall, int(hwm.read_text()) / 1024


def video_bench(args: argparse.Namespace) -> None:
    with isolated_home() as home:
        # Supabase's default limit for standard uploads: a large video can only go up through TUS.
        os.environ["HEIMDEX_STORAGE_FILE_SIZE_LIMIT"] = str(DEFAULT_FILE_SIZE_LIMIT)
        clip = argparse.Namespace(checkpoint=None, precision="fp32", batch=32)
        os.environ.update(clip_env(clip, home))
        settings = Settings.from_env()
        services.vector_store(settings), services.storage(settings)  # started here: commands find them
        server_pid = json.loads((home / "storage" / "server.json").read_text())["pid"]
        folder = Path(args.keep_video) if args.keep_video else home
        rows = []
        for label, mb in (("small", args.small_mb), ("large", args.large_mb)):
            path = folder / f"memory-{mb}mb.mkv"
            if not path.exists():
                (frames, made_s) = timed(lambda path=path, mb=mb: make_video(path, mb * MiB))
                size_mb = path.stat().st_size / MiB
                print(f"{label}: {size_mb:,.0f} MiB video, {frames:,} frames, made in {made_s:.1f} s")
            with PeakRss(server_pid) as server:
                out, add_s, add_mb = run_command(["add-video", str(path)], home)
            match = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", out)
            assert match, out
            out, proc_s, proc_mb = run_command(
                ["process-video", "--video-id", match.group(), "--backend", args.backend], home
            )
            scenes = sum(1 for line in out.splitlines() if re.match(r"\W*\d+\W", line))
            rows.append((label, path.stat().st_size / MiB, add_s, add_mb, proc_s, proc_mb, server.peak / MiB))
            print(
                f"{label:5} {rows[-1][1]:>7,.0f} MiB: add-video {add_s:5.1f} s, peak RSS {add_mb:4.0f} MB "
                f"(storage server peak {rows[-1][6]:.0f} MB); process-video {proc_s:5.1f} s, "
                f"peak RSS {proc_mb:4.0f} MB; {scenes} scene lines"
            )
        (_, small_size, _, small_add, _, small_proc, _), (_, large_size, _, large_add, _, large_proc, _) = (
            rows
        )
        for what, small, large in (
            ("add-video", small_add, large_add),
            ("process-video", small_proc, large_proc),
        ):
            delta = large - small
            verdict = "ok" if delta <= TARGET_VIDEO_DELTA_MB else "MISSED"
            print(
                f"{what}: {large_size:,.0f} MiB video {large:.0f} MB vs {small_size:,.0f} MiB video "
                f"{small:.0f} MB: {delta:+.0f} MB (target <= +{TARGET_VIDEO_DELTA_MB}: {verdict})"
            )
        print(load_note())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bench", nargs="?", choices=("backfill", "video"), default="backfill")
    parser.add_argument("--scenes", type=int, default=1_000_000, help="backfill: scene rows")
    parser.add_argument("--videos", type=int, default=20_000, help="backfill: videos they belong to")
    parser.add_argument("--large-mb", type=int, default=2048, help="video: size of the large video, MiB")
    parser.add_argument("--small-mb", type=int, default=20, help="video: size of the small video, MiB")
    parser.add_argument("--backend", choices=("local", "off"), default="local", help="video: CLIP backend")
    parser.add_argument("--keep-video", help="video: folder to keep (and reuse) the generated videos in")
    args = parser.parse_args()
    (video_bench if args.bench == "video" else backfill_bench)(args)


if __name__ == "__main__":
    main()
