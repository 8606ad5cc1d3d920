"""Vector-store bench: bulk load, HNSW build, top-10 latency and recall on the real schema.

    .venv/bin/python bench/db.py [--rows 100000] [--queries 200]

Uses ``DATABASE_URL`` or the embedded server under ``HEIMDEX_HOME``, in a scratch database dropped at the
end. Vectors are clustered like CLIP embeddings (scenes of one video sit close together; uniform random
512-d vectors are a much harder, unrealistic case for any ANN index). Recall@10 is measured against exact
search: the same query with index scans disabled, i.e. a sequential scan.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg.conninfo import make_conninfo

from heimdex_clip_assets.adapters.db import VectorStore
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.services import resolve_database_url

DIM = 512
SCENES_PER_VIDEO = 100
HNSW_INDEX = "video_scenes_embedding_visual_clip_hnsw_idx"
QUERY_SQL = (
    "SELECT id FROM video_scenes WHERE embedding_visual_clip IS NOT NULL"
    " ORDER BY embedding_visual_clip <=> %s LIMIT 10"
)


def bulk_load(
    conn: psycopg.Connection, copy_sql: str, rows: Iterable[Sequence[object]], types: list[str] | None = None
) -> tuple[float, float]:
    """``COPY`` ``rows`` into video_scenes as a bulk load should: loading into an HNSW-indexed table is
    ~100x slower than loading first, so the index is dropped, the rows copied, and the index rebuilt
    exactly as the migration defines it (then ANALYZE). Returns (load seconds, index build seconds)."""
    conn.execute("SET maintenance_work_mem = '1GB'")  # the whole graph fits: no slow on-disk phase
    index_def = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (HNSW_INDEX,)).fetchone()
    conn.execute(f"DROP INDEX {HNSW_INDEX}")
    t0 = time.perf_counter()
    with conn.cursor().copy(copy_sql) as copy:
        if types:
            copy.set_types(types)
        for row in rows:
            copy.write_row(row)
    conn.commit()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    conn.execute(index_def[0])  # type: ignore[index]
    conn.commit()
    build_s = time.perf_counter() - t0
    conn.execute("ANALYZE video_scenes")
    conn.commit()
    return load_s, build_s


def clustered_vectors(rng: np.random.Generator, n: int, centers: np.ndarray) -> np.ndarray:
    """Unit vectors around random cluster centres (cosine to their centre ~0.8, like one video's scenes)."""
    x = centers[rng.integers(len(centers), size=n)] + 0.75 * rng.standard_normal((n, DIM)) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[40, 100, 200])
    args = parser.parse_args()

    admin = resolve_database_url(Settings.from_env())
    name = f"heimdex_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = make_conninfo(admin, dbname=name)
    try:
        run(dsn, args.rows, args.queries, args.ef_search)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def run(dsn: str, rows: int, queries: int, ef_values: list[int]) -> None:
    store = VectorStore(dsn, DIM)
    store.migrate()
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((rows // SCENES_PER_VIDEO, DIM)) / np.sqrt(DIM)
    data = clustered_vectors(rng, rows, centers)
    probes = clustered_vectors(rng, queries, centers)
    videos = [uuid.uuid4() for _ in range(len(centers))]

    # prepare_threshold=None: a query prepared while index scans were off would keep its cached
    # sequential-scan plan after they are back on.
    with psycopg.connect(dsn, prepare_threshold=None) as conn:
        register_vector(conn)
        conn.execute("SET max_parallel_maintenance_workers = 1")  # leader + 1 worker = the 2 cores
        owner = uuid.uuid4()
        conn.execute("INSERT INTO auth.users (id) VALUES (%s)", (owner,))
        with conn.cursor().copy("COPY videos (id, owner_id, storage_path) FROM STDIN") as copy:
            for vid in videos:
                copy.write_row((vid, owner, f"{owner}/{vid}/source.mp4"))

        def scenes() -> Iterator[tuple[object, ...]]:
            for i, vec in enumerate(data):
                vid, idx = videos[i // SCENES_PER_VIDEO], i % SCENES_PER_VIDEO
                url = f"http://x/storage/v1/object/public/videos/{owner}/{vid}/thumbnails/scene_{idx}.jpg"
                yield (vid, idx, idx, idx + 1.0, url, vec)

        load_s, build_s = bulk_load(
            conn,
            'COPY video_scenes (video_id, "index", start_s, end_s, thumbnail_url, embedding_visual_clip)'
            " FROM STDIN WITH (FORMAT BINARY)",
            scenes(),
            ["uuid", "int4", "float8", "float8", "text", "vector"],
        )
        print(f"rows {rows}, dim {DIM}: COPY {load_s:.2f} s ({rows / load_s:,.0f} rows/s)")
        print(f"HNSW build (m 16, ef_construction 64, 1 worker + leader): {build_s:.1f} s")

        truth = []
        with conn.transaction():
            conn.execute("SET LOCAL enable_indexscan = off")
            for q in probes:
                truth.append({r[0] for r in conn.execute(QUERY_SQL, (q,))})
        plan = " ".join(str(line) for line in conn.execute("EXPLAIN " + QUERY_SQL, (probes[0],)))
        print(f"plan uses the HNSW index: {'hnsw' in plan}")

        for ef in ef_values:
            latencies, hits = [], 0
            with conn.transaction():
                conn.execute(f"SET LOCAL hnsw.ef_search = {ef}")
                conn.execute("SET LOCAL enable_seqscan = off")  # as VectorStore.search does
                for q, exact in zip(probes, truth, strict=True):
                    t0 = time.perf_counter()
                    found = {r[0] for r in conn.execute(QUERY_SQL, (q,))}
                    latencies.append(time.perf_counter() - t0)
                    hits += len(found & exact)
            p50, p95 = np.percentile(latencies, [50, 95]) * 1000
            recall = hits / (10 * queries)
            print(f"ef_search {ef:>3}: p50 {p50:.2f} ms, p95 {p95:.2f} ms, recall@10 {recall:.3f}")

    # The API as the pipeline calls it: a fresh connection per search, default ef_search.
    latencies = []
    for q in probes:
        t0 = time.perf_counter()
        store.search(q, k=10)
        latencies.append(time.perf_counter() - t0)
    p50, p95 = np.percentile(latencies, [50, 95]) * 1000
    print(f"VectorStore.search (connect + query): p50 {p50:.2f} ms, p95 {p95:.2f} ms")


if __name__ == "__main__":
    main()
