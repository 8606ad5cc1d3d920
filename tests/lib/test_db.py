"""The vector store against a real embedded PostgreSQL 18 + pgvector."""

from __future__ import annotations

import multiprocessing
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest

from heimdex_clip_assets.adapters.db import (
    EmbeddingRow,
    SceneRecord,
    VectorStore,
    VideoRecord,
)
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.postgres import embedded_postgres
from heimdex_clip_assets.services import dagster_storage_url, resolve_database_url
from heimdex_clip_contract.errors import (
    DatabaseError,
    InvalidRequestError,
    ModelMismatchError,
    NotFoundError,
)

DIM = 512
MODEL = "openai-vit-b-32-v1"


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def metadata(model_version: str = MODEL, backend: str = "runpod", inference_ms: float = 45.0) -> dict:
    return {
        "backend": backend,
        "model_name": "ViT-B-32",
        "pretrained": "openai",
        "model_version": model_version,
        "inference_time_ms": inference_ms,
        "download_ms": 3.0,
        "total_ms": inference_ms + 3.0,
    }


def scene(index: int, sha: str | None = None) -> SceneRecord:
    return SceneRecord(
        index=index,
        start_s=index * 2.0,
        end_s=index * 2.0 + 2.0,
        keyframe_s=index * 2.0 + 1.0,
        thumbnail_path=f"thumbnails/v/{index}.jpg",
        thumbnail_sha256=sha or f"sha-{index}",
    )


def add_video(store: VectorStore, n_scenes: int = 3, *, shas: list[str] | None = None) -> str:
    video_id = str(uuid.uuid4())
    store.upsert_video(VideoRecord(id=video_id, storage_path=f"videos/{video_id}.mp4", filename="a.mp4"))
    store.replace_scenes(video_id, [scene(i, shas[i] if shas else None) for i in range(n_scenes)])
    return video_id


def embed_all(
    store: VectorStore, video_id: str, rng: np.random.Generator, **meta: object
) -> list[np.ndarray]:
    vectors = [unit(rng) for _ in store.scenes(video_id)]
    rows = [EmbeddingRow(i, v, metadata(**meta)) for i, v in enumerate(vectors)]  # type: ignore[arg-type]
    store.write_embeddings(video_id, rows)
    return vectors


# ------------------------------------------------------------------------------------------ schema
def test_migrations_are_versioned_and_idempotent(pg_database: str) -> None:
    store = VectorStore(pg_database, DIM)
    assert store.migrate() == [1, 2]
    assert store.migrate() == []
    with psycopg.connect(pg_database) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (2,)
        indexdef = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'video_scenes' AND indexdef LIKE '%hnsw%'"
        ).fetchone()
    assert indexdef is not None and "vector_cosine_ops" in indexdef[0]


def _migrate(dsn: str) -> list[int]:
    return VectorStore(dsn, DIM).migrate()


def test_concurrent_migrations_apply_once(pg_database: str) -> None:
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_migrate, [pg_database] * 4)
    assert sorted(results) == [[], [], [], [1, 2]]


def test_dimension_mismatch_is_refused(store: VectorStore) -> None:
    with pytest.raises(ModelMismatchError, match=r"512-dimensional.*768"):
        VectorStore(store.dsn, 768).migrate()
    video_id = add_video(store, 1)
    with pytest.raises(ModelMismatchError, match="shape"):
        store.write_embeddings(video_id, [EmbeddingRow(0, np.ones(768), metadata())])
    with pytest.raises(InvalidRequestError, match="NaN"):
        store.write_embeddings(video_id, [EmbeddingRow(0, np.full(DIM, np.nan), metadata())])
    with pytest.raises(ModelMismatchError):
        store.search(np.ones(768))


def test_unreachable_database_is_retryable(tmp_path: Path) -> None:
    store = VectorStore(f"postgresql://postgres@/postgres?host={tmp_path}", DIM)
    with pytest.raises(DatabaseError, match="DATABASE_URL") as info:
        store.migrate()
    assert info.value.retryable


def test_resolve_database_url(embedded_home: Path) -> None:
    external = Settings.from_env(
        {"HEIMDEX_HOME": str(embedded_home), "DATABASE_URL": "postgresql://u:p@db/x"}
    )
    assert resolve_database_url(external) == "postgresql://u:p@db/x"
    assert dagster_storage_url(external) == "postgresql+psycopg2://u:p@db/x"

    settings = Settings.from_env({"HEIMDEX_HOME": str(embedded_home)})
    try:
        url = resolve_database_url(settings)
        assert resolve_database_url(settings) == url  # a second call re-attaches
        assert settings.clip_dim == 512  # ViT-B-32, the default model
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert (
            dagster_storage_url(settings)
            == f"postgresql+psycopg2://postgres@/postgres?host={embedded_home}/pg"
        )
    finally:
        embedded_postgres(embedded_home).stop()


# ------------------------------------------------------------------------------------------ videos
def test_video_upsert_status_and_listing(store: VectorStore) -> None:
    video = VideoRecord(id=str(uuid.uuid4()), storage_path="videos/a.mp4", duration_s=12.5, fps=25.0)
    store.upsert_video(video)
    store.upsert_video(VideoRecord(**{**video.__dict__, "width": 1280, "height": 720}))
    got = store.get_video(video.id)
    assert got is not None and (got.width, got.duration_s, got.status) == (1280, 12.5, "pending")
    store.set_video_status(video.id, "failed", "no video stream")
    failed = store.get_video(video.id)
    assert failed is not None and (failed.status, failed.error) == ("failed", "no video stream")
    assert store.get_video(str(uuid.uuid4())) is None
    with pytest.raises(NotFoundError):
        store.set_video_status(str(uuid.uuid4()), "ready")


# ------------------------------------------------------------------------------------------ scenes
def test_replace_scenes_keeps_embeddings_of_unchanged_thumbnails(store: VectorStore) -> None:
    rng = np.random.default_rng(1)
    video_id = add_video(store, 3)
    vectors = embed_all(store, video_id, rng)
    before = {s.index: s for s in store.scenes(video_id)}

    # 0 unchanged, 1 new thumbnail content, 2 gone, 3 new
    store.replace_scenes(video_id, [scene(0), scene(1, "sha-changed"), scene(3)])
    after = {s.index: s for s in store.scenes(video_id)}
    assert sorted(after) == [0, 1, 3]
    assert after[0].id == before[0].id and after[0].embedding is not None
    np.testing.assert_allclose(after[0].embedding, vectors[0], rtol=1e-6)
    assert after[0].metadata == metadata()
    assert after[1].embedding is None and after[1].metadata is None
    assert after[3].embedding is None

    with pytest.raises(InvalidRequestError):
        store.replace_scenes(video_id, [scene(0), scene(0)])
    with pytest.raises(NotFoundError):
        store.replace_scenes(str(uuid.uuid4()), [scene(0)])


def test_write_embeddings_is_idempotent(store: VectorStore) -> None:
    rng = np.random.default_rng(2)
    video_id = add_video(store, 50)
    embed_all(store, video_id, rng)
    vectors = embed_all(store, video_id, rng)  # a rerun overwrites in place
    scenes = store.scenes(video_id)
    assert len(scenes) == 50
    for s, v in zip(scenes, vectors, strict=True):
        np.testing.assert_allclose(s.embedding, v, rtol=1e-6)


def test_failed_batch_leaves_previous_state(store: VectorStore) -> None:
    rng = np.random.default_rng(3)
    video_id = add_video(store, 4)
    old = embed_all(store, video_id, rng, backend="local")
    new = [EmbeddingRow(i, unit(rng), metadata(backend="runpod")) for i in range(4)]

    bad_vector = [*new[:2], EmbeddingRow(2, np.full(DIM, np.inf), metadata()), new[3]]
    with pytest.raises(InvalidRequestError):
        store.write_embeddings(video_id, bad_vector)
    # A failure inside the database, after two rows were written: the whole transaction rolls back.
    with pytest.raises(NotFoundError, match="nothing written"):
        store.write_embeddings(video_id, [*new[:2], EmbeddingRow(99, unit(rng), metadata()), new[3]])
    with pytest.raises(InvalidRequestError, match="model_version"):
        store.write_embeddings(video_id, [EmbeddingRow(0, unit(rng), {"backend": "runpod"})])

    for s, v in zip(store.scenes(video_id), old, strict=True):
        np.testing.assert_allclose(s.embedding, v, rtol=1e-6)
        assert s.metadata is not None and s.metadata["backend"] == "local"


def _write_video(args: tuple[str, str, int]) -> None:
    dsn, video_id, seed = args
    store = VectorStore(dsn, DIM)
    rng = np.random.default_rng(seed)
    for _ in range(5):
        store.replace_scenes(video_id, [scene(i) for i in range(20)])
        store.write_embeddings(video_id, [EmbeddingRow(i, unit(rng), metadata()) for i in range(20)])


def test_concurrent_writers_never_duplicate(store: VectorStore) -> None:
    video_id = add_video(store, 0)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_write_video, [(store.dsn, video_id, 1), (store.dsn, video_id, 2)])
    scenes = store.scenes(video_id)
    assert [s.index for s in scenes] == list(range(20))
    assert all(s.embedding is not None for s in scenes)


# ------------------------------------------------------------------------------ staleness and cache
def test_stale_and_missing_embeddings(store: VectorStore) -> None:
    rng = np.random.default_rng(4)
    fresh = add_video(store, 2)
    embed_all(store, fresh, rng)
    stale = add_video(store, 2)
    embed_all(store, stale, rng, model_version="old-model-v0")
    missing = add_video(store, 3)

    def needing(**kwargs: object) -> list[tuple[str, int]]:
        return [(s.video_id, s.index) for page in store.iter_scenes_to_embed(MODEL, **kwargs) for s in page]

    expected = sorted([(stale, 0), (stale, 1), (missing, 0), (missing, 1), (missing, 2)])
    assert needing() == expected
    # Keyset pages: any page size gives the same scenes, in (video, index) order, each once.
    assert needing(page_size=2) == expected
    assert [len(p) for p in store.iter_scenes_to_embed(MODEL, page_size=2)] == [2, 2, 1]
    assert needing(video_ids=[missing]) == [(missing, i) for i in range(3)]
    assert needing(video_ids=[fresh]) == []
    assert len(needing(video_ids=[fresh], force=True)) == 2
    assert set(store.videos_needing_embeddings(MODEL, [fresh, stale, missing])) == {stale, missing}
    assert dict(store.embedding_backlog(MODEL)) == {stale: 2, missing: 3}

    assert store.clear_embeddings(fresh) == 2
    assert len(needing(video_ids=[fresh])) == 2


def test_cached_embeddings_across_videos(store: VectorStore) -> None:
    rng = np.random.default_rng(5)
    first = add_video(store, 2, shas=["aaa", "bbb"])
    vectors = embed_all(store, first, rng)
    add_video(store, 2, shas=["aaa", "ccc"])  # the same first frame in another video

    cached = store.cached_embeddings(["aaa", "ccc", "zzz"], MODEL)
    assert set(cached) == {"aaa"}
    np.testing.assert_allclose(cached["aaa"][0], vectors[0], rtol=1e-6)
    assert cached["aaa"][1]["model_version"] == MODEL
    assert store.cached_embeddings(["aaa"], "other-model") == {}
    assert store.cached_embeddings([], MODEL) == {}


# ------------------------------------------------------------------------------------------ search
def test_search_finds_planted_near_duplicates(store: VectorStore) -> None:
    rng = np.random.default_rng(6)
    videos = [add_video(store, 40) for _ in range(3)]
    for video_id in videos:
        embed_all(store, video_id, rng)
    target = store.scenes(videos[1])[7]
    assert target.embedding is not None
    query = target.embedding + 0.05 * unit(rng)

    hits = store.search(query, k=5)
    assert (hits[0].video_id, hits[0].index, hits[0].scene_id) == (videos[1], 7, target.id)
    assert hits[0].score > 0.99
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].thumbnail_path == target.thumbnail_path and hits[0].start_s == target.start_s

    in_video = store.search(query, k=10, video_id=videos[2])
    assert len(in_video) == 10 and {h.video_id for h in in_video} == {videos[2]}
    assert store.search(query, k=3, model_version="other-model") == []
