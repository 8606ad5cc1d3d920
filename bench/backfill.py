"""Backfill bench: the embedding engine against an endpoint that answers like the worker, with latency.

    .venv/bin/python bench/backfill.py [--videos 400] [--scenes-per-video 50] [--latency-ms 200]
                                       [--batch 256] [--in-flight 3] [--fetch] [--today-videos 40]
                                       [--endpoint URL --secret-env VAR]

Setup: ``videos x scenes`` scene rows (20,000 by default) in the embedded database, a small JPEG thumbnail
per scene in the embedded storage, and the loopback worker (``devservices/loopback_worker.py``) in its
own process: it verifies each job's signature, waits until ``--latency-ms`` after the job arrived (its own
work falls within that time), optionally downloads every signed URL (``--fetch``) and answers with unit
vectors. The RunPod backend and client are the real ones.

On a small shared machine, a longer ``--latency-ms`` (500) and fewer scenes (``--videos 100``) show the
ratio with less of the CPU in it.

Two runs in one process, on the same rows, endpoint and machine:

* today: what the pipeline did before the engine (one video at a time, 32 images per job, one job in
  flight), over ``--today-videos`` videos;
* engine: the whole library through the engine with ``--batch`` images per job and ``--in-flight`` jobs
  (the defaults: CLIP_BATCH_SIZE=256, RUNPOD_MAX_IN_FLIGHT=3).

It prints images/s, jobs in flight (as the endpoint saw them), the ratio to the endpoint's ideal
``in_flight x batch / latency``, the engine over today, and how busy the database writes kept their
connections. The engine runs twice: with the schema's HNSW index (every vector written walks the graph,
~2-3 ms of database CPU each, so on a small shared machine the database is the limit), then with the
index dropped from this throwaway database: the engine's own speed against the endpoint.

``--endpoint`` points the same bench at a real worker (``python -m runpod_worker.handler --rp_serve_api``,
or ``bench/worker_api.py`` where the RunPod SDK is not installed; IMAGE_ALLOW_PRIVATE_HOSTS=true so it
may fetch from the embedded storage on loopback; the same CLIP_MODEL_NAME/CLIP_PRETRAINED in this
process); thumbnails are then real 480x270 JPEGs and every URL is fetched. ``bench/gpu_backfill.sh``
runs it all on a GPU machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
from _common import isolated_home, load_note, timed

from heimdex_clip_assets import services
from heimdex_clip_assets.adapters.clip_backends import RunPodBackend
from heimdex_clip_assets.adapters.db import SceneEmbedding, SceneRecord, VectorStore, VideoRecord
from heimdex_clip_assets.adapters.runpod_client import RunPodClient
from heimdex_clip_assets.adapters.storage import Storage
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.loopback_worker import LoopbackConfig, LoopbackVectors
from heimdex_clip_assets.devservices.net import NotReadyError, port_file_url, wait_until
from heimdex_clip_assets.devservices.synthetic import jpeg
from heimdex_clip_assets.pipeline.embed import EmbeddingEngine, EngineReport

TODAY_BATCH, TODAY_IN_FLIGHT = 32, 1
TARGET_RATIO, TARGET_SPEEDUP = 0.8, 10.0


def populate(
    store: VectorStore, storage: Storage, videos: int, per_video: int, size: tuple[int, int]
) -> list[str]:
    """Videos of one owner with ``per_video`` scenes each, in the seed's layout (thumbnails at
    ``{owner}/{video}/thumbnails/scene_{i}.jpg``, ``thumbnail_url`` in public form); a distinct
    thumbnail per scene (no cache hits)."""
    jpegs = [jpeg(*size, seed=i, quality=85) for i in range(64)]
    ids = [str(uuid.UUID(int=v + 1)) for v in range(videos)]
    owner = str(uuid.UUID(int=1 << 64))
    store.ensure_owner(owner)

    def one(v: int) -> None:
        video_id = ids[v]
        store.add_video(
            VideoRecord(id=video_id, owner_id=owner, storage_path=f"{owner}/{video_id}/source.mp4")
        )
        records = []
        for i in range(per_video):
            path = f"{owner}/{video_id}/thumbnails/scene_{i}.jpg"
            storage.upload(path, jpegs[(v + i) % len(jpegs)], content_type="image/jpeg")
            records.append(SceneRecord(i, i, i + 1, storage.public_url(path), i + 0.5, f"{video_id}-{i}"))
        store.insert_scenes(video_id, records)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(videos)))
    return ids


def start_loopback(
    latency_ms: float, secret: str, fetch: bool, folder: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port_file = folder / "loopback.port"
    cmd = [
        sys.executable,
        "-m",
        "heimdex_clip_assets.devservices.loopback_worker",
        "--port-file",
        str(port_file),
    ]
    cmd += ["--latency-ms", str(latency_ms)] + (["--fetch"] if fetch else [])
    proc = subprocess.Popen(cmd, env={**os.environ, "EMBEDDING_HMAC_SECRET": secret})
    try:
        return proc, wait_until(
            "the loopback worker",
            lambda: port_file_url(port_file, "/stats", any_status=True),
            timeout_s=30,
            proc=proc,
        )
    except NotReadyError:
        proc.kill()
        raise


def hnsw_indexes(store: VectorStore, action: str) -> list[str]:
    """``action`` ("DROP INDEX", "REINDEX INDEX") on the HNSW indexes of this bench's throwaway
    database; returns their names."""
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        names = [
            row[0]
            for row in conn.execute(
                "SELECT indexname FROM pg_indexes"
                " WHERE tablename = 'video_scenes' AND indexdef ILIKE '%hnsw%'"
            )
        ]
        for name in names:
            conn.execute(f'{action} "{name}"')
    return names


def vacuum(store: VectorStore) -> None:
    """Reclaim the rows the last run left dead, so no autovacuum of them competes with the next run
    for the same cores (it did, at random, moving the ratio by 0.1)."""
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) public.video_scenes")


def database_alone(store: VectorStore, version: str, threads: int, batch: int) -> float:
    """Vectors/s the database takes when nothing but writes asks anything of it. After the engine's
    run with the index: the same scenes are cleared and written again from the same empty graph, with
    vectors of the loopback endpoint's kind and the engine's metadata, a job's rows per transaction,
    on ``threads`` connections as the engine's writers."""
    (row,) = store.query(
        "SELECT visual_clip_metadata FROM public.video_scenes WHERE embedding_visual_clip IS NOT NULL LIMIT 1"
    )
    store.clear_embeddings()
    vacuum(store)
    hnsw_indexes(store, "REINDEX INDEX")  # empty as the engine found it: no deleted entries to reuse
    scenes = [scene for page in store.iter_scenes_to_embed(version) for scene in page]
    vectors = LoopbackVectors(store.dim)([f"http://bench/{scene.thumbnail_path}" for scene in scenes])
    embeddings = [
        SceneEmbedding(scene.id, vector, row["visual_clip_metadata"])
        for scene, vector in zip(scenes, vectors, strict=True)
    ]
    work = [embeddings[k : k + batch] for k in range(0, len(embeddings), batch)]

    def writer(mine: list[list[SceneEmbedding]]) -> None:
        with store.holding_connection():
            for job in mine:
                store.write_scene_embeddings(job)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(writer, [work[i::threads] for i in range(threads)]))
    return len(embeddings) / (time.perf_counter() - started)


class Spy:
    """Seconds spent in the store's embedding writes (summed over the engine's threads)."""

    def __init__(self, store: VectorStore) -> None:
        self.seconds = 0.0
        original = store.write_scene_embeddings

        def timed_write(rows):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return original(rows)
            finally:
                self.seconds += time.perf_counter() - t0

        store.write_scene_embeddings = timed_write  # type: ignore[method-assign]


def run_today(
    store: VectorStore, backend: RunPodBackend, video_ids: list[str], model_version: str
) -> tuple[int, float]:
    """The pre-engine pipeline: each video on its own, 32 images per job, one job at a time."""
    engine = EmbeddingEngine(
        store, backend, batch_size=TODAY_BATCH, max_in_flight=TODAY_IN_FLIGHT, use_cache=False
    )
    images, started = 0, time.perf_counter()
    for video_id in video_ids:
        images += engine.run(store.iter_scenes_to_embed(model_version, video_ids=[video_id])).embedded
    return images, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=400)
    parser.add_argument("--scenes-per-video", type=int, default=50)
    parser.add_argument("--latency-ms", type=float, default=200.0, help="the loopback worker's time per job")
    parser.add_argument("--batch", type=int, default=256, help="CLIP_BATCH_SIZE (default: RunPod's)")
    parser.add_argument("--in-flight", type=int, default=3, help="RUNPOD_MAX_IN_FLIGHT (default 3)")
    parser.add_argument("--fetch", action="store_true", help="the loopback worker downloads every URL")
    parser.add_argument("--today-videos", type=int, default=40, help="videos for the pre-engine run")
    parser.add_argument("--write-threads", type=int, default=4, help="connections writing vectors")
    parser.add_argument("--endpoint", help="a real worker's URL instead of the loopback one")
    parser.add_argument("--secret-env", default="EMBEDDING_HMAC_SECRET", help="with --endpoint")
    args = parser.parse_args()

    with isolated_home() as home:
        real = args.endpoint is not None
        secret = os.environ.get(args.secret_env) if real else "bench-secret"
        if not secret:
            raise SystemExit(f"--endpoint needs the worker's secret in {args.secret_env}")
        loopback = None
        if real:
            url = args.endpoint.rstrip("/")
            # The worker's model version, derived as it derives it (CLIP_MODEL_NAME, CLIP_PRETRAINED).
            env = Settings.from_env()
            model = dict(model_name=env.clip_model_name, model_version=env.clip_model_version)
        else:
            loopback, url = start_loopback(args.latency_ms, secret, args.fetch, home)
            cfg = LoopbackConfig()
            model = dict(model_name=cfg.model, model_version=cfg.model_version)
        try:
            settings = Settings.from_env()
            store, storage = services.vector_store(settings), services.storage(settings)
            size = (480, 270) if real else (64, 36)
            video_ids, setup_s = timed(
                lambda: populate(store, storage, args.videos, args.scenes_per_video, size)
            )
            total = args.videos * args.scenes_per_video
            print(f"setup: {total} scenes in {args.videos} videos, thumbnails in storage, in {setup_s:.1f} s")
            print(
                "endpoint: "
                + (f"real worker at {url}" if real else f"loopback, {args.latency_ms:g} ms per job")
                + (", every URL fetched" if real or args.fetch else "")
            )
            client = RunPodClient(url, api_key=None, hmac_secret=secret, timeout_s=120, dim=512, **model)
            backend = RunPodBackend(client, storage, pretrained="bench", expires_in=300)
            version = backend.model_version

            spy = Spy(store)
            today_images, today_s = run_today(store, backend, video_ids[: args.today_videos], version)
            today_rate = today_images / today_s
            print(
                f"today  (per video, {TODAY_BATCH}/job, {TODAY_IN_FLIGHT} in flight): {today_images} images "
                f"in {today_s:.1f} s = {today_rate:,.0f} images/s"
            )

            for phase in ("with the HNSW index", "without the HNSW index"):
                if phase.startswith("without"):
                    dropped = hnsw_indexes(store, "DROP INDEX")
                    print(f"-- dropped {', '.join(dropped)}: the engine when the database is not the limit")
                store.clear_embeddings()
                vacuum(store)
                spy.seconds = 0.0
                if loopback is not None:
                    httpx.post(f"{url}/stats/reset")
                engine = EmbeddingEngine(
                    store,
                    backend,
                    batch_size=args.batch,
                    max_in_flight=args.in_flight,
                    write_threads=args.write_threads,
                    use_cache=False,
                )
                report: EngineReport = engine.run(store.iter_scenes_to_embed(version))
                assert report.embedded == total and not report.failed, report.failure_summary()
                rate = report.embedded / report.wall_s
                seen = (
                    httpx.get(f"{url}/stats").json()["max_in_flight"]
                    if loopback is not None
                    else report.peak_in_flight
                )
                print(
                    f"engine {phase} ({args.batch}/job, {args.in_flight} in flight): "
                    f"{report.embedded} images in {report.wall_s:.1f} s = {rate:,.0f} images/s; "
                    f"{report.jobs} jobs, peak in flight {seen} (endpoint) / {report.peak_in_flight} (engine)"
                )
                jobs_ms = sorted(s * 1000 for s in report.job_seconds)
                slot_busy = sum(jobs_ms) / 1000 / (report.wall_s * args.in_flight)
                print(
                    f"  a job from sending to its checked vectors: median {jobs_ms[len(jobs_ms) // 2]:.0f} "
                    f"ms, p90 {jobs_ms[len(jobs_ms) * 9 // 10]:.0f} ms; slots busy {slot_busy:.0%} of the run"
                )
                busy = spy.seconds / (report.wall_s * args.write_threads)
                print(
                    f"  database writes: {spy.seconds:.1f} s on {args.write_threads} writer connections "
                    f"({report.embedded / max(spy.seconds, 1e-9):,.0f} vectors/s each, busy {busy:.0%} of "
                    "the run)"
                )
                if not real:
                    ideal = args.in_flight * args.batch / (args.latency_ms / 1000)
                    ratio = rate / ideal
                    print(
                        f"  ideal in_flight x batch / latency = {ideal:,.0f} images/s; ratio {ratio:.2f} "
                        f"(target >= {TARGET_RATIO}: {'ok' if ratio >= TARGET_RATIO else 'MISSED'})"
                    )
                if phase.startswith("with the"):
                    ceiling = database_alone(store, version, args.write_threads, args.batch)
                    print(
                        f"  the database alone, same index and {args.write_threads} connections: "
                        f"{ceiling:,.0f} vectors/s; the engine reached {rate / ceiling:.2f} of it"
                    )
                speedup = rate / today_rate
                print(
                    f"  engine / today: x{speedup:.1f} (target >= {TARGET_SPEEDUP:g}: "
                    f"{'ok' if speedup >= TARGET_SPEEDUP else 'MISSED'})"
                )
            print(load_note())
            client.close()
        finally:
            if loopback is not None:
                loopback.terminate()
                loopback.wait(10)


if __name__ == "__main__":
    main()
