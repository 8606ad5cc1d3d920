"""Search service bench: `heimdex-clip serve` text-query latency and throughput, next to its raw parts.

    .venv/bin/python bench/search.py [--scenes 100000] [--clients 16] [--queries 800]

One run, on embedded defaults in a temporary HEIMDEX_HOME: the scenes are bulk-loaded (clustered unit
vectors, as bench/db.py makes them), the server runs as its own process with the local text encoder (a
random-init ViT-B-32: the same compute as real weights), and ``--clients`` concurrent clients send
queries. Measured with the same query texts and the same concurrency, one after the other:

- raw pgvector top-10: the ORDER BY <=> LIMIT 10 query on a persistent connection per client;
- raw text encoder: ``ClipEncoder.encode_text([query])`` per query, in this process;
- the API, distinct queries (every vector computed) and then the same queries again (the query cache).

The overhead is the API's p50 over the sum of the two raw p50s. Thumbnails and videos are small stand-in
objects (2,000 thumbnails shared by the scenes, one object per video), so signing is real but a popular
thumbnail's signed URL is reused, as it is in service.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psycopg
from _common import clip_env, isolated_home, load_note
from db import DIM, SCENES_PER_VIDEO, bulk_load, clustered_vectors
from pgvector.psycopg import register_vector
from psycopg.types.json import Jsonb

from heimdex_clip_assets import services
from heimdex_clip_assets.adapters.storage import Storage
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.net import NotReadyError, answers, free_port, wait_until
from heimdex_clip_assets.devservices.synthetic import jpeg

ROOT = Path(__file__).resolve().parents[1]
THUMBNAILS = 2000
RAW_SQL = (
    "SELECT id FROM video_scenes WHERE embedding_visual_clip IS NOT NULL"
    " ORDER BY embedding_visual_clip <=> %s LIMIT 10"
)
ADJECTIVES = (
    "red",
    "blue",
    "green",
    "old",
    "small",
    "crowded",
    "empty",
    "snowy",
    "rainy",
    "sunny",
    "dark",
    "bright",
    "quiet",
    "busy",
    "wooden",
)
SUBJECTS = (
    "car",
    "dog",
    "cat",
    "child",
    "bicycle",
    "train",
    "boat",
    "horse",
    "bird",
    "street",
    "market",
    "kitchen",
    "beach",
    "forest",
    "bridge",
)
PLACES = [
    "at night",
    "in the rain",
    "at sunset",
    "in a city",
    "near the sea",
    "in the mountains",
    "indoors",
    "from above",
]


def query_texts(n: int) -> list[str]:
    """``n`` distinct, plausible queries."""
    combos = itertools.product(ADJECTIVES, SUBJECTS, PLACES)
    texts = [f"a {adj} {subject} {place}" for adj, subject, place in combos]
    if n > len(texts):
        raise SystemExit(f"--queries is at most {len(texts)}")
    rng = np.random.default_rng(1)
    return [texts[i] for i in rng.permutation(len(texts))[:n]]


def load_scenes(dsn: str, storage: Storage, rows: int, model_version: str) -> None:
    """Videos of ten owners, ``rows`` embedded scenes, the stand-in objects; HNSW built after the load."""
    rng = np.random.default_rng(0)
    videos = rows // SCENES_PER_VIDEO
    centers = rng.standard_normal((videos, DIM)) / np.sqrt(DIM)
    vectors = clustered_vectors(rng, rows, centers)
    video_ids = [uuid.uuid4() for _ in range(videos)]
    owners = [uuid.uuid4() for _ in range(10)]
    data = jpeg(480, 270, quality=80)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: storage.upload(f"bench/thumbs/{i}.jpg", data), range(THUMBNAILS)))
        list(
            pool.map(lambda v: storage.upload(f"bench/videos/{v}.mp4", b"\0" * 1024, "video/mp4"), video_ids)
        )
    print(f"storage: {THUMBNAILS + videos:,} stand-in objects uploaded in {time.perf_counter() - t0:.1f} s")
    meta = Jsonb({"backend": "local", "model_version": model_version})
    with psycopg.connect(dsn) as conn:
        register_vector(conn)
        with conn.cursor().copy("COPY auth.users (id) FROM STDIN") as copy:  # owner_id references them
            for owner in owners:
                copy.write_row((owner,))
        with conn.cursor().copy("COPY videos (id, storage_path, filename, owner_id) FROM STDIN") as copy:
            for i, vid in enumerate(video_ids):
                copy.write_row(
                    (vid, f"bench/videos/{vid}.mp4", f"video-{i:05d}.mp4", owners[i % len(owners)])
                )

        def scenes() -> Iterator[tuple[object, ...]]:
            for i, vec in enumerate(vectors):
                vid, idx = video_ids[i // SCENES_PER_VIDEO], i % SCENES_PER_VIDEO
                url = storage.public_url(f"bench/thumbs/{i % THUMBNAILS}.jpg")  # the seed's form
                yield (vid, idx, idx * 2.0, idx * 2.0 + 2, url, vec, meta)

        load_s, build_s = bulk_load(
            conn,
            'COPY video_scenes (video_id, "index", start_s, end_s, thumbnail_url, embedding_visual_clip,'
            " visual_clip_metadata) FROM STDIN",
            scenes(),
        )
        print(
            f"scenes: {rows:,} in {videos:,} videos loaded in {load_s:.1f} s, HNSW built in {build_s:.1f} s"
        )


# ---------------------------------------------------------------------------------------- timing
def closed_loop(
    clients: int, items: Sequence[object], call: Callable[[object], None]
) -> tuple[np.ndarray, float]:
    """Each of ``clients`` threads takes the next item and calls ``call`` on it, until none are left.
    Returns the per-call latencies (s) and the wall time."""
    todo = iter(items)
    latencies: list[float] = []

    def worker() -> None:
        for item in todo:  # the shared iterator hands each item to exactly one thread
            t0 = time.perf_counter()
            call(item)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    return np.array(latencies), time.perf_counter() - t0


async def api_loop(base: str, clients: int, texts: Sequence[str]) -> tuple[np.ndarray, float]:
    """The API under ``clients`` concurrent HTTP clients (asyncio: the client side stays cheap)."""
    todo = iter(texts)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

        async def one_client() -> None:
            for text in todo:
                t0 = time.perf_counter()
                reply = await client.get("/v1/search", params={"q": text, "limit": 10})
                latencies.append(time.perf_counter() - t0)
                if reply.status_code != 200 or len(reply.json()["hits"]) != 10:
                    raise SystemExit(f"bad answer: {reply.status_code} {reply.text[:300]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
    return np.array(latencies), time.perf_counter() - t0


def row(name: str, latencies: np.ndarray, wall: float) -> float:
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) * 1000
    print(f"{name:<28} {p50:8.1f} {p95:8.1f} {p99:8.1f} {len(latencies) / wall:9.0f}")
    return float(p50)


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "heimdex_clip_assets.cli", "serve", "--port", str(port), "--keep-services"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until("serve", lambda: answers(f"{base}/healthz"), timeout_s=120, proc=proc, interval_s=0.3)
    except NotReadyError as exc:
        raise SystemExit(
            f"{exc}: {proc.stderr.read().decode() if exc.exited is not None and proc.stderr else ''}"
        ) from None
    return proc, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--queries", type=int, default=800, help="distinct queries per phase")
    parser.add_argument("--checkpoint", help="weights file (default: CLIP_PRETRAINED, else random ViT-B-32)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    with isolated_home() as home:
        os.environ.update(clip_env(args, home))
        settings = Settings.from_env()
        store, storage = services.vector_store(settings), services.storage(settings)
        load_scenes(store.dsn, storage, args.scenes, settings.clip_model_version)
        texts = query_texts(args.queries)

        # Raw text encoder: one query per call, the clients taking turns on the one model.
        encoder = services.text_image_encoder(settings)
        encoder.encode_text(texts[:4])  # first-call warm-up
        vectors = {}

        def encode(text: object) -> None:
            vectors[text] = encoder.encode_text([str(text)])[0]

        enc_lat, enc_wall = closed_loop(args.clients, texts, encode)

        # Raw pgvector top-10, the same query vectors, a persistent connection per client.
        local = threading.local()

        def top10(text: object) -> None:
            if not hasattr(local, "conn"):
                local.conn = psycopg.connect(store.dsn, autocommit=True)
                register_vector(local.conn)
                local.conn.execute("SET hnsw.ef_search = 100")
            local.conn.execute(RAW_SQL, (vectors[text],)).fetchall()

        top10(texts[0])
        pg_lat, pg_wall = closed_loop(args.clients, texts, top10)

        env = {**os.environ, "SEARCH_CACHE_SIZE": str(2 * args.queries)}
        proc, base = start_server(env)
        try:
            asyncio.run(api_loop(base, 4, [f"warm up {i}" for i in range(32)]))
            cold_lat, cold_wall = asyncio.run(api_loop(base, args.clients, texts))
            warm_lat, warm_wall = asyncio.run(api_loop(base, args.clients, texts))
            rss = next(
                int(line.split()[1]) / 1024
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                if line.startswith("VmRSS")
            )
            metrics = httpx.get(f"{base}/metrics").text
        finally:
            proc.terminate()
            proc.wait(20)

        calls = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith('heimdex_search_encoder_calls_total{backend="local",kind="text"}')
        )
        print(
            f"\n{args.scenes:,} scenes, {args.clients} concurrent clients, {len(texts)} distinct queries "
            f"per phase; {load_note()}"
        )
        print(f"{'':<28} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'queries/s':>9}")
        pg_p50 = row("raw pgvector top-10", pg_lat, pg_wall)
        enc_p50 = row("raw text encoder", enc_lat, enc_wall)
        api_p50 = row("API GET /v1/search", cold_lat, cold_wall)
        row("API, repeated queries", warm_lat, warm_wall)
        print(
            f"API overhead: p50 {api_p50:.1f} ms / (pgvector {pg_p50:.1f} + encoder {enc_p50:.1f}) = "
            f"{api_p50 / (pg_p50 + enc_p50):.2f}x; {calls:.0f} encoder calls for "
            f"{len(texts) + 32} new queries (batched); server RSS {rss:.0f} MB"
        )
        print("goal: p50 <= 40 ms, p99 <= 150 ms, overhead <= 1.3x")


if __name__ == "__main__":
    main()
