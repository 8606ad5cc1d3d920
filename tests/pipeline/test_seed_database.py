"""On the seed system's own database and storage (``tests/fixtures/seed_system.py``): nothing of theirs is
changed or lost, existing scenes are adopted, new ones are written in that system's layout, and its own
search functions and the guide's SQL work on what the project writes."""

from __future__ import annotations

import io
import re
import uuid
from pathlib import Path
from unittest import mock

import psycopg
import pytest
from rich.console import Console

from heimdex_clip_assets import services
from heimdex_clip_assets.adapters.db import METADATA_KEYS, VectorStore
from heimdex_clip_assets.cli import backfill as backfill_cli
from heimdex_clip_assets.cli import main
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.pipeline import keyframes
from heimdex_clip_assets.pipeline.register import register_video
from heimdex_clip_contract.errors import ModelMismatchError, NotFoundError
from tests.fixtures.seed_system import SeedSystem, row_hashes, seed_storage

CLIP_COLUMNS = ("embedding_visual_clip", "visual_clip_metadata")
README = Path(__file__).resolve().parents[2] / "README.md"


def backfill() -> str:
    """``heimdex-clip backfill`` in this process; its output."""
    out = io.StringIO()
    with mock.patch.object(backfill_cli, "console", Console(file=out, width=300)):
        main(["backfill"])
    return out.getvalue()


def scene_rows(dsn: str, video_id: str) -> list[dict]:
    with psycopg.connect(dsn, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(
            "SELECT id::text, index, start_s, end_s, thumbnail_url,"
            " embedding_visual_clip IS NOT NULL AS has_clip, visual_clip_metadata"
            " FROM video_scenes WHERE video_id = %s ORDER BY index",
            (video_id,),
        ).fetchall()


def test_backfill_fills_exactly_the_clip_columns(seed_env: SeedSystem) -> None:
    before = row_hashes(seed_env.dsn)
    before_others = row_hashes(seed_env.dsn, exclude=CLIP_COLUMNS)

    out = backfill()
    assert "7 embedded, 0 failed, 1 skipped without a thumbnail" in out

    # Every other column of every row, videos included, is byte-identical; only scenes changed.
    assert row_hashes(seed_env.dsn, exclude=CLIP_COLUMNS) == before_others
    after = row_hashes(seed_env.dsn)
    changed = {key for key in after if after[key] != before[key]}
    assert {table for table, _ in changed} == {"video_scenes"} and len(changed) == 7
    for video_id in seed_env.videos:
        for row in scene_rows(seed_env.dsn, video_id):
            assert row["has_clip"] == (row["thumbnail_url"] is not None)
            if row["has_clip"]:
                assert set(METADATA_KEYS) <= set(row["visual_clip_metadata"])
                meta = row["visual_clip_metadata"]
                assert (meta["embed_dim"], meta["normalized"], meta["error"]) == (512, True, None)

    # Their videos keep their status; the project's progress is in its own table.
    with psycopg.connect(seed_env.dsn) as conn:
        states = dict(conn.execute("SELECT video_id::text, state FROM heimdex_clip.videos").fetchall())
        assert states == dict.fromkeys(seed_env.videos, "embedded")
        assert conn.execute(
            "SELECT bool_and(relrowsecurity) FROM pg_class WHERE oid IN ('videos'::regclass,"
            " 'video_scenes'::regclass)"
        ).fetchone() == (True,)

    # A rerun changes nothing.
    assert "0 scene(s) in 0 video(s)" in backfill()
    assert row_hashes(seed_env.dsn) == after


def test_seed_search_functions_and_step7_sql_on_what_the_project_wrote(seed_env: SeedSystem) -> None:
    backfill()
    owner_a, owner_b = seed_env.owners
    video_b = next(v for v, o in seed_env.videos.items() if o == owner_b)
    target = scene_rows(seed_env.dsn, video_b)[1]
    store = services.vector_store(Settings.from_env())
    (vector,) = (s.embedding for s in store.scenes(video_b) if s.index == 1)
    query = "[" + ",".join(f"{x:.8f}" for x in vector) + "]"
    with psycopg.connect(seed_env.dsn) as conn:
        top = conn.execute(
            "SELECT id::text, similarity FROM search_scenes_by_visual_clip_embedding(%s::vector, 0.5, 20,"
            " NULL, %s)",
            (query, owner_b),
        ).fetchall()
        assert top[0][0] == target["id"] and top[0][1] > 0.999
        # filter_user_id keeps tenants apart: owner A never sees owner B's scene.
        others = conn.execute(
            "SELECT id::text FROM search_scenes_by_visual_clip_embedding(%s::vector, -1, 100, NULL, %s)",
            (query, owner_a),
        ).fetchall()
        assert others and target["id"] not in {r[0] for r in others}
        scored = conn.execute(
            "SELECT id::text FROM batch_score_scenes_clip(%s::vector, %s::uuid[], %s)",
            (query, [target["id"]], owner_a),
        ).fetchall()
        assert scored == []
    assert {h.owner_id for h in store.search(vector, k=20, user_id=owner_a)} == {owner_a}

    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S)
    step7 = store.query(blocks[0].replace("<test-video-uuid>", video_b))
    assert [(r["has_clip"], r["backend"]) for r in step7] == [(True, "local")] * 3


def test_a_dagster_partition_adopts_existing_scenes(seed_env: SeedSystem, materialize) -> None:
    video_id = next(iter(seed_env.videos))
    before = row_hashes(seed_env.dsn, exclude=CLIP_COLUMNS)
    result = materialize(video_id)
    assert result.success
    mats = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    assert mats["scene_keyframes"]["adopted"].value is True
    assert mats["scene_clip_embeddings"]["computed"].value == 3
    assert row_hashes(seed_env.dsn, exclude=CLIP_COLUMNS) == before
    assert all(r["has_clip"] for r in scene_rows(seed_env.dsn, video_id))


def test_a_video_without_scenes_gets_them_in_the_seed_layout(
    seed_env: SeedSystem, materialize, sample_video: Path, storage_server
) -> None:
    owner = seed_env.owners[1]
    video_id = seed_env.add_video(owner, data=sample_video.read_bytes(), status="PROCESSING")
    videos_before = {k: v for k, v in row_hashes(seed_env.dsn).items() if k[0] == "videos"}
    assert materialize(video_id).success

    rows = scene_rows(seed_env.dsn, video_id)
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and all(r["has_clip"] for r in rows)
    assert rows[0]["start_s"] == 0 and rows[1]["start_s"] == pytest.approx(rows[0]["end_s"])
    for row in rows:
        path = f"{owner}/{video_id}/thumbnails/scene_{row['index']}.jpg"
        assert row["thumbnail_url"] == f"{storage_server.url}/storage/v1/object/public/videos/{path}"
        assert seed_env.storage.exists(path)
    # Its video row, status included, is that system's: untouched.
    assert {k: v for k, v in row_hashes(seed_env.dsn).items() if k[0] == "videos"} == videos_before


def test_videos_the_project_registers_are_ready_after_backfill(
    seed_env: SeedSystem, sample_video: Path
) -> None:
    settings = Settings.from_env()
    store, storage = services.vector_store(settings), services.storage(settings)
    owner = seed_env.owners[0]
    with pytest.raises(NotFoundError, match="not a user of this database"):
        register_video(sample_video, store=store, storage=storage, owner_id=str(uuid.uuid4()))
    video_id = register_video(sample_video, store=store, storage=storage, owner_id=owner)
    video = store.get_video(video_id)
    assert video is not None and video.storage_path == f"{owner}/{video_id}/source.mp4"
    assert (video.filename, video.status, video.registered) == (sample_video.name, "PENDING", True)

    keyframes.extract_keyframes(video_id, store=store, storage=storage)
    assert (store.get_video(video_id) or video).status == "PROCESSING"
    backfill()
    assert (store.get_video(video_id) or video).status == "READY"


def test_bad_thumbnails_fail_alone_with_one_sentence(seed_env: SeedSystem) -> None:
    video_id = next(iter(seed_env.videos))
    with psycopg.connect(seed_env.dsn) as conn:
        conn.execute(
            "UPDATE video_scenes SET thumbnail_url = 'https://cdn.example.com/x.jpg' WHERE video_id = %s"
            " AND index = 0",
            (video_id,),
        )
        gone = seed_env.storage.public_url(f"{seed_env.videos[video_id]}/{video_id}/thumbnails/gone.jpg")
        conn.execute(
            "UPDATE video_scenes SET thumbnail_url = %s WHERE video_id = %s AND index = 1", (gone, video_id)
        )
    out = backfill()
    assert "5 embedded, 2 failed" in out
    # Each failure is one line naming the scene and the object it could not read.
    failures = [line for line in out.splitlines() if line.startswith("✗")]
    assert len(failures) == 2 and "https://cdn.example.com/x.jpg" in failures[0] and "gone.jpg" in failures[1]
    assert all("not found" in line.lower() for line in failures), failures
    assert [r["has_clip"] for r in scene_rows(seed_env.dsn, video_id)] == [False, False, True]


def test_older_schema_without_clip_columns_is_migrated(make_seed_db, storage_server) -> None:
    dsn = make_seed_db(clip_dim=None)
    system = SeedSystem(dsn, seed_storage(storage_server))
    system.add_scenes(system.add_video(system.add_owner()), 2)
    before = row_hashes(dsn)
    assert VectorStore(dsn, 512).migrate() == [1, 2, 3]
    assert row_hashes(dsn, exclude=CLIP_COLUMNS) == before
    with psycopg.connect(dsn) as conn:
        assert conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'video_scenes'::regclass AND attname = 'embedding_visual_clip'"
        ).fetchone() == ("vector(512)",)
        assert conn.execute(
            "SELECT count(*) FROM pg_proc WHERE proname IN ('search_scenes_by_visual_clip_embedding',"
            " 'batch_score_scenes_clip')"
        ).fetchone() == (2,)


def test_a_768_column_is_refused_before_any_change(make_seed_db) -> None:
    dsn = make_seed_db(clip_dim=768)
    with pytest.raises(
        ModelMismatchError, match=r"768-dimensional vectors but the configured model makes 512"
    ):
        VectorStore(dsn, 512).migrate()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regnamespace('heimdex_clip')").fetchone() == (None,)


def test_a_database_without_the_tables_is_one_sentence(
    pg_database: str, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    with psycopg.connect(pg_database) as conn:
        conn.execute("CREATE TABLE customers (id int)")
    monkeypatch.setenv("HEIMDEX_HOME", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", pg_database)
    assert main(["backfill", "--backend", "local", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "has no videos and video_scenes tables" in err and "Traceback" not in err
