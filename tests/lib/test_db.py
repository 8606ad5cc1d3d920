"""The vector store against a real embedded PostgreSQL 18 + pgvector."""

from __future__ import annotations

import multiprocessing
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest

from heimdex_clip_assets.adapters.db import EmbeddingRow, SceneRecord, VectorStore, VideoRecord
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.postgres import embedded_postgres
from heimdex_clip_assets.services import dagster_storage_url, resolve_database_url
from heimdex_clip_contract.errors import (
    DatabaseError,
    InvalidRequestError,
    ModelMismatchError,
    NotFoundError,
)
from tests.fixtures.rows import MODEL, OWNER, add_video, clip_metadata, scene

DIM = 512


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def metadata(model_version: str = MODEL, backend: str = "runpod", inference_ms: float = 45.0) -> dict:
    return clip_metadata(model_version, backend, inference_ms)


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
    assert store.migrate() == [1, 2, 3]
    assert store.migrate() == []
    with psycopg.connect(pg_database) as conn:
        assert conn.execute("SELECT count(*) FROM heimdex_clip.schema_migrations").fetchone() == (3,)
        indexdef = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'video_scenes' AND indexdef LIKE '%hnsw%'"
        ).fetchone()
        # The seed system's shape: its enum, RLS on, the search functions.
        assert conn.execute("SELECT enum_range(NULL::video_status)::text").fetchone() == (
            "{PENDING,PROCESSING,READY,FAILED}",
        )
        assert conn.execute(
            "SELECT bool_and(relrowsecurity) FROM pg_class WHERE oid IN ('videos'::regclass,"
            " 'video_scenes'::regclass)"
        ).fetchone() == (True,)
        assert conn.execute(
            "SELECT count(*) FROM pg_proc WHERE proname IN ('search_scenes_by_visual_clip_embedding',"
            " 'batch_score_scenes_clip')"
        ).fetchone() == (2,)
    assert indexdef is not None and "vector_cosine_ops" in indexdef[0]


def test_foreign_and_old_databases_are_refused(pg_database: str) -> None:
    with psycopg.connect(pg_database) as conn:
        conn.execute("CREATE TABLE invoices (id int)")
    with pytest.raises(DatabaseError, match="no videos and video_scenes tables but holds 1 other"):
        VectorStore(pg_database, DIM).migrate()
    with psycopg.connect(pg_database) as conn:  # the pre-seed-layout heimdex-clip tables
        conn.execute("CREATE TABLE videos (id uuid PRIMARY KEY, fps float)")
        conn.execute("CREATE TABLE video_scenes (id uuid PRIMARY KEY)")
    with pytest.raises(DatabaseError, match="not the Heimdex layout"):
        VectorStore(pg_database, DIM).migrate()


def _migrate(dsn: str) -> list[int]:
    return VectorStore(dsn, DIM).migrate()


def test_concurrent_migrations_apply_once(pg_database: str) -> None:
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_migrate, [pg_database] * 4)
    assert sorted(results) == [[], [], [], [1, 2, 3]]


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
def test_registered_video_states_and_status(store: VectorStore) -> None:
    store.ensure_owner(OWNER)
    video = VideoRecord(id=str(uuid.uuid4()), owner_id=OWNER, storage_path="o/v/source.mp4", duration_s=12.5)
    assert store.add_video(video)
    assert not store.add_video(VideoRecord(**{**video.__dict__, "storage_path": "elsewhere"}))
    store.update_video_info(video.id, duration_s=12.5, frame_rate=25.0, width=1280, height=720)
    got = store.get_video(video.id)
    assert got is not None
    assert (got.width, got.frame_rate, got.storage_path, got.status) == (
        1280,
        25.0,
        "o/v/source.mp4",
        "PENDING",
    )
    assert (got.registered, got.state) == (True, "registered")
    store.set_video_state(video.id, "failed", "no video stream")
    failed = store.get_video(video.id)
    assert failed is not None
    assert (failed.status, failed.error_message, failed.state, failed.error) == (
        "FAILED",
        "no video stream",
        "failed",
        "no video stream",
    )
    store.set_video_state(video.id, "embedded")
    assert (store.get_video(video.id) or video).status == "READY"
    assert store.get_video(str(uuid.uuid4())) is None
    with pytest.raises(NotFoundError):
        store.set_video_state(str(uuid.uuid4()), "embedded")
    with pytest.raises(InvalidRequestError, match="unknown video state"):
        store.set_video_state(video.id, "ready")


def test_owners_outside_a_local_auth_table_must_exist(store: VectorStore) -> None:
    stranger = str(uuid.uuid4())
    store.ensure_owner(stranger)  # the fresh database's stand-in auth.users takes local users
    with psycopg.connect(store.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM auth.users WHERE id = %s", (stranger,)).fetchone() == (1,)
        conn.execute("DELETE FROM heimdex_clip.settings WHERE key = 'local_auth_users'")
    with pytest.raises(NotFoundError, match="not a user of this database"):
        store.ensure_owner(str(uuid.uuid4()))
    store.ensure_owner(stranger)


# ------------------------------------------------------------------------------------------ scenes
def test_existing_scenes_are_never_replaced(store: VectorStore) -> None:
    rng = np.random.default_rng(1)
    video_id = add_video(store, 3)
    vectors = embed_all(store, video_id, rng)
    before = store.scenes(video_id)
    assert [(s.keyframe_s, s.thumbnail_sha256) for s in before] == [
        (1.0, "sha-0"),
        (3.0, "sha-1"),
        (5.0, "sha-2"),
    ]

    assert store.insert_scenes(video_id, [scene(0, "sha-changed"), scene(3)]) == 0
    after = store.scenes(video_id)
    assert [(s.id, s.index, s.thumbnail_sha256) for s in after] == [
        (s.id, s.index, s.thumbnail_sha256) for s in before
    ]
    np.testing.assert_allclose(after[0].embedding, vectors[0], rtol=1e-6)
    assert after[0].metadata == metadata()

    with pytest.raises(InvalidRequestError):
        store.insert_scenes(video_id, [scene(0), scene(0)])
    with pytest.raises(NotFoundError):
        store.insert_scenes(str(uuid.uuid4()), [scene(0)])


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


def test_a_held_connection_serves_a_thread_and_survives_its_loss(
    store: VectorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine writer's calls share one connection; a failed call rolls back and leaves it usable;
    a connection the server dropped while idle is replaced, not failed on."""
    rng = np.random.default_rng(4)
    video_id = add_video(store, 3)
    pid = "SELECT pg_backend_pid() AS pid"
    with store.holding_connection():
        first = store.query(pid)[0]["pid"]
        embed_all(store, video_id, rng)
        with pytest.raises(NotFoundError):
            store.write_embeddings(video_id, [EmbeddingRow(9, unit(rng), metadata())])
        assert store.query(pid)[0]["pid"] == first
        assert all(s.embedding is not None for s in store.scenes(video_id))

        with psycopg.connect(store.dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        monkeypatch.setattr("heimdex_clip_assets.adapters.db.HELD_CHECK_AFTER_S", 0.0)
        second = store.query(pid)[0]["pid"]
        assert second != first
    assert store.query(pid)[0]["pid"] != second  # outside the block: a connection per call again


def _write_video(args: tuple[str, str, int]) -> None:
    dsn, video_id, seed = args
    store = VectorStore(dsn, DIM)
    rng = np.random.default_rng(seed)
    for _ in range(5):
        store.insert_scenes(video_id, [scene(i) for i in range(20)])
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
    assert hits[0].thumbnail_url == target.thumbnail_url and hits[0].start_s == target.start_s
    assert hits[0].owner_id == OWNER

    in_video = store.search(query, k=10, video_id=videos[2])
    assert len(in_video) == 10 and {h.video_id for h in in_video} == {videos[2]}
    assert store.search(query, k=3, model_version="other-model") == []


def test_search_keeps_tenants_apart(store: VectorStore) -> None:
    rng = np.random.default_rng(7)
    other = "00000000-0000-4000-8000-0000000000f2"
    mine, theirs = add_video(store, 5), add_video(store, 5, owner=other)
    for video_id in (mine, theirs):
        embed_all(store, video_id, rng)
    query = store.scenes(theirs)[2].embedding
    assert store.search(query, k=1)[0].video_id == theirs
    hits = store.search(query, k=10, user_id=OWNER)
    assert len(hits) == 5 and {h.owner_id for h in hits} == {OWNER}


def test_scenes_without_thumbnail_are_not_to_embed(store: VectorStore) -> None:
    video_id = add_video(store, 0)
    store.insert_scenes(video_id, [scene(0), SceneRecord(1, 2.0, 4.0, None, 3.0, "sha-x")])
    (page,) = store.iter_scenes_to_embed(MODEL, video_ids=[video_id])
    assert [(s.index, s.thumbnail_path) for s in page] == [(0, f"{OWNER}/v/thumbnails/scene_0.jpg")]
    assert store.count_scenes_without_thumbnail(video_id) == 1
    assert store.videos_needing_embeddings(MODEL, [video_id]) == [video_id]
    store.write_embeddings(video_id, [EmbeddingRow(0, unit(np.random.default_rng(8)), metadata())])
    assert store.videos_needing_embeddings(MODEL, [video_id]) == []
