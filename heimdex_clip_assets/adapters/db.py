"""The vector store: videos, their scenes and CLIP embeddings in PostgreSQL + pgvector.

With ``DATABASE_URL`` unset, ``services`` points it at an embedded PostgreSQL under ``HEIMDEX_HOME``.
Every method opens a short connection: unix-socket connects cost about a millisecond, and no connection
outlives a call, so a store can be shared by threads and handed to forked processes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg.vector import register_vector_info
from psycopg.rows import dict_row
from psycopg.types import TypeInfo
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from heimdex_clip_contract.errors import DatabaseError, InvalidRequestError, ModelMismatchError, NotFoundError

# Any constant works; it only has to be the same in every process that migrates this database.
_MIGRATION_LOCK_KEY = 0x4845_494D_4445_58
# Keys every embedding's metadata carries: the seed's monitoring SQL reads backend and inference time,
# and staleness queries compare model_version.
METADATA_KEYS: tuple[str, ...] = (
    "backend",
    "model_name",
    "pretrained",
    "model_version",
    "inference_time_ms",
    "download_ms",
    "total_ms",
)
# ef_search 100 gives recall@10 >= 0.95 on 100k vectors in the bench at ~1-3 ms per query.
DEFAULT_EF_SEARCH = 100


@dataclass
class VideoRecord:
    id: str
    storage_path: str
    filename: str | None = None
    duration_s: float | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    status: str = "pending"
    error: str | None = None
    owner_id: str | None = None  # the user whose video it is; search confines users to their own
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass
class SceneRecord:
    """One scene. ``id`` is assigned by the database on first write; ``embedding`` and ``metadata`` are
    read-only here (``replace_scenes`` ignores them; ``write_embeddings`` sets them)."""

    index: int
    start_s: float
    end_s: float
    keyframe_s: float
    thumbnail_path: str
    thumbnail_sha256: str
    id: str | None = None
    video_id: str | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class EmbeddingRow:
    index: int
    vector: Sequence[float] | np.ndarray
    metadata: dict[str, Any]


@dataclass(frozen=True)
class SceneEmbedding:
    """A vector for one scene, addressed by the scene's id (so one write can span videos)."""

    scene_id: str
    vector: Sequence[float] | np.ndarray
    metadata: dict[str, Any]


@dataclass(frozen=True)
class SceneToEmbed:
    """What the embedding engine needs of a scene: no vectors, so a page of them stays small."""

    id: str
    video_id: str
    index: int
    thumbnail_path: str
    thumbnail_sha256: str | None
    embedded_at: float | None  # when its current vector was made, if it has one


@dataclass(frozen=True)
class RegisteredVideo:
    """A video id with its place in registration order, as an opaque sensor cursor."""

    id: str
    cursor: str


@dataclass(frozen=True)
class SearchHit:
    video_id: str
    scene_id: str
    index: int
    start_s: float
    end_s: float
    thumbnail_path: str
    score: float
    filename: str | None = None
    video_path: str | None = None  # the video's storage path


# ---------------------------------------------------------------------------------------- migrations
def _migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for each ``migrations/NNNN_name.sql``, in order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text()))
    return sorted(found)


class VectorStore:
    def __init__(self, dsn: str, dim: int, *, pool_size: int = 0) -> None:
        """``pool_size`` > 0 keeps up to that many connections open (a server: connecting costs 1-8 ms,
        more than a search); 0 opens one per call, so the store can be handed to forked processes."""
        if dim <= 0:
            raise InvalidRequestError(f"embedding dimension must be positive, got {dim}")
        self.dsn = dsn
        self.dim = dim
        # The vector type's OID, looked up once: pgvector's register_vector costs four round trips on
        # every connection, more than the search itself.
        self._vector_type: TypeInfo | None = None
        self._pool = (
            ConnectionPool(
                dsn,
                min_size=1,
                max_size=pool_size,
                kwargs={"row_factory": dict_row, "connect_timeout": 10},
                configure=self._configure,
            )
            if pool_size
            else None
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        self._register_vector(conn)
        conn.commit()  # a pooled connection must be idle, not inside the lookup's transaction

    # ------------------------------------------------------------------------------------ plumbing
    def _where(self) -> str:
        """The server, for messages, without credentials."""
        info = psycopg.conninfo.conninfo_to_dict(self.dsn)
        return f"host={info.get('host', 'localhost')} dbname={info.get('dbname', '?')}"

    @contextmanager
    def _connect(self, *, vectors: bool = True) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """A connection in a transaction (committed on success), with database errors made typed."""
        try:
            if self._pool is not None:
                with self._pool.connection() as conn:
                    yield conn
                return
            with psycopg.connect(self.dsn, row_factory=dict_row, connect_timeout=10) as conn:
                if vectors:
                    self._register_vector(conn)
                yield conn
        except psycopg.OperationalError as exc:
            raise DatabaseError(
                f"cannot reach PostgreSQL ({self._where()}): {str(exc).strip()}; check DATABASE_URL "
                "and that the server is running",
                retryable=True,
            ) from exc
        except psycopg.errors.UndefinedTable as exc:
            raise DatabaseError(f"the schema is missing ({exc}); run migrations first") from exc
        except psycopg.Error as exc:
            raise DatabaseError(f"database error ({self._where()}): {str(exc).strip()}") from exc

    def _register_vector(self, conn: psycopg.Connection[Any]) -> None:
        if self._vector_type is None:
            self._vector_type = TypeInfo.fetch(conn, "vector")
            if self._vector_type is None:
                raise DatabaseError(f"pgvector is not installed in {self._where()}; run migrations first")
        register_vector_info(conn, self._vector_type)

    def _check_vector(self, vector: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(vector, dtype=np.float32)
        if arr.shape != (self.dim,):
            raise ModelMismatchError(
                f"{what} has shape {arr.shape}, but the store holds {self.dim}-dimensional embeddings; "
                "check CLIP_MODEL_NAME"
            )
        if not np.isfinite(arr).all():
            raise InvalidRequestError(f"{what} holds NaN or infinite values")
        return arr

    # ---------------------------------------------------------------------------------------- schema
    def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied (empty when up to date).

        An advisory lock held for the transaction serialises processes migrating at once: the second
        waits, then finds nothing to do. Raises :class:`ModelMismatchError` when the table was made
        for another embedding width.
        """
        applied = []
        with self._connect(vectors=False) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row["version"] for row in conn.execute("SELECT version FROM schema_migrations")}
            for version, name, sql in _migrations():
                if version in done:
                    continue
                conn.execute(sql.replace("{dim}", str(self.dim)))
                conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
                applied.append(version)
            row = conn.execute(
                "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'video_scenes'::regclass"
                " AND attname = 'embedding_visual_clip'"
            ).fetchone()
        if row is not None and row["atttypmod"] != self.dim:
            raise ModelMismatchError(
                f"video_scenes.embedding_visual_clip holds {row['atttypmod']}-dimensional vectors but the "
                f"configured model makes {self.dim}; use a model of that width (CLIP_MODEL_NAME) or a new "
                "database (DATABASE_URL)"
            )
        return applied

    # ---------------------------------------------------------------------------------------- videos
    def upsert_video(self, video: VideoRecord) -> None:
        with self._connect(vectors=False) as conn:
            conn.execute(
                "INSERT INTO videos (id, storage_path, filename, duration_s, fps, width, height, status,"
                " error, owner_id) VALUES (%(id)s, %(storage_path)s, %(filename)s, %(duration_s)s, %(fps)s,"
                " %(width)s, %(height)s, %(status)s, %(error)s, %(owner_id)s)"
                " ON CONFLICT (id) DO UPDATE SET storage_path = EXCLUDED.storage_path,"
                " filename = EXCLUDED.filename, duration_s = EXCLUDED.duration_s, fps = EXCLUDED.fps,"
                " width = EXCLUDED.width, height = EXCLUDED.height, status = EXCLUDED.status,"
                " error = EXCLUDED.error, updated_at = now()",
                video.__dict__,
            )

    def get_video(self, video_id: str) -> VideoRecord | None:
        with self._connect(vectors=False) as conn:
            row = conn.execute("SELECT * FROM videos WHERE id = %s", (video_id,)).fetchone()
        if row is None:
            return None
        owner = row["owner_id"]
        return VideoRecord(**{**row, "id": str(row["id"]), "owner_id": None if owner is None else str(owner)})

    def videos_registered_after(self, cursor: str | None, limit: int) -> list[RegisteredVideo]:
        """Videos registered after ``cursor`` (a previous result's ``.cursor``), oldest first.

        Ordered by (created_at, id) so ties in created_at neither repeat nor skip a video.
        """
        created_at, last_id = cursor.split("|", 1) if cursor else ("-infinity", str(uuid.UUID(int=0)))
        with self._connect(vectors=False) as conn:
            rows = conn.execute(
                "SELECT id, created_at FROM videos WHERE (created_at, id) > (%s::timestamptz, %s::uuid)"
                " ORDER BY created_at, id LIMIT %s",
                (created_at, last_id, limit),
            ).fetchall()
        return [RegisteredVideo(str(r["id"]), f"{r['created_at'].isoformat()}|{r['id']}") for r in rows]

    def videos_done(self, video_ids: Sequence[str], model_version: str) -> set[str]:
        """Those of ``video_ids`` whose scenes exist and all carry a ``model_version`` embedding."""
        with self._connect(vectors=False) as conn:
            rows = conn.execute(
                "SELECT video_id FROM video_scenes WHERE video_id = ANY(%s::uuid[]) GROUP BY video_id"
                " HAVING count(*) FILTER (WHERE embedding_visual_clip IS NULL"
                "        OR visual_clip_metadata->>'model_version' IS DISTINCT FROM %s) = 0",
                (list(video_ids), model_version),
            ).fetchall()
        return {str(row["video_id"]) for row in rows}

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        """Rows of a read-only SQL statement, e.g. the README's monitoring queries."""
        with self._connect() as conn:
            return conn.execute(sql, params).fetchall()

    def set_video_status(self, video_id: str, status: str, error: str | None = None) -> None:
        with self._connect(vectors=False) as conn:
            cur = conn.execute(
                "UPDATE videos SET status = %s, error = %s, updated_at = now() WHERE id = %s",
                (status, error, video_id),
            )
            if cur.rowcount == 0:
                raise NotFoundError(f"video {video_id} is not in the videos table")

    # ---------------------------------------------------------------------------------------- scenes
    def replace_scenes(self, video_id: str, scenes: Sequence[SceneRecord]) -> None:
        """Make the video's scenes exactly ``scenes``, keyed by index, in one transaction.

        A scene whose thumbnail content (sha256) is unchanged keeps its embedding; a changed one loses
        it, so it is re-embedded. The video row is locked first, so two runs of one video serialise
        instead of deadlocking on each other's scene rows.
        """
        indexes = [scene.index for scene in scenes]
        if len(set(indexes)) != len(indexes):
            raise InvalidRequestError(f"scenes of video {video_id} repeat an index")
        with self._connect(vectors=False) as conn:
            if conn.execute("SELECT 1 FROM videos WHERE id = %s FOR UPDATE", (video_id,)).fetchone() is None:
                raise NotFoundError(f"video {video_id} is not in the videos table; upsert it first")
            conn.execute(
                'DELETE FROM video_scenes WHERE video_id = %s AND NOT ("index" = ANY(%s))',
                (video_id, indexes),
            )
            with conn.cursor() as cur:
                cur.executemany(
                    'INSERT INTO video_scenes AS s (video_id, "index", start_s, end_s, keyframe_s,'
                    " thumbnail_path, thumbnail_sha256)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s)"
                    ' ON CONFLICT (video_id, "index") DO UPDATE SET start_s = EXCLUDED.start_s,'
                    " end_s = EXCLUDED.end_s, keyframe_s = EXCLUDED.keyframe_s,"
                    " thumbnail_path = EXCLUDED.thumbnail_path, thumbnail_sha256 = EXCLUDED.thumbnail_sha256,"
                    " embedding_visual_clip = CASE WHEN s.thumbnail_sha256 = EXCLUDED.thumbnail_sha256"
                    " THEN s.embedding_visual_clip END,"
                    " visual_clip_metadata = CASE WHEN s.thumbnail_sha256 = EXCLUDED.thumbnail_sha256"
                    " THEN s.visual_clip_metadata END,"
                    " updated_at = now()",
                    [
                        (
                            video_id,
                            s.index,
                            s.start_s,
                            s.end_s,
                            s.keyframe_s,
                            s.thumbnail_path,
                            s.thumbnail_sha256,
                        )
                        for s in sorted(scenes, key=lambda s: s.index)
                    ],
                )

    _SCENE_COLUMNS = (
        'id, video_id, "index", start_s, end_s, keyframe_s, thumbnail_path, thumbnail_sha256,'
        " embedding_visual_clip, visual_clip_metadata"
    )

    @staticmethod
    def _scene(row: dict[str, Any]) -> SceneRecord:
        embedding = row["embedding_visual_clip"]
        return SceneRecord(
            index=row["index"],
            start_s=row["start_s"],
            end_s=row["end_s"],
            keyframe_s=row["keyframe_s"],
            thumbnail_path=row["thumbnail_path"],
            thumbnail_sha256=row["thumbnail_sha256"],
            id=str(row["id"]),
            video_id=str(row["video_id"]),
            embedding=None if embedding is None else embedding.to_numpy(),
            metadata=row["visual_clip_metadata"],
        )

    def scenes(self, video_id: str) -> list[SceneRecord]:
        with self._connect() as conn:
            rows = conn.execute(
                f'SELECT {self._SCENE_COLUMNS} FROM video_scenes WHERE video_id = %s ORDER BY "index"',
                (video_id,),
            ).fetchall()
        return [self._scene(row) for row in rows]

    # ------------------------------------------------------------------------------------ embeddings
    def write_embeddings(self, video_id: str, rows: Sequence[EmbeddingRow]) -> None:
        """Store embeddings for scenes of one video in one transaction.

        Everything is validated before the first write, and any failure rolls the whole batch back, so
        a crash leaves the previous embeddings; writing the same rows again changes nothing.
        """
        params = []
        for row in rows:
            vector = self._check_vector(row.vector, f"embedding of scene {row.index} of video {video_id}")
            missing = [key for key in METADATA_KEYS if key not in row.metadata]
            if missing:
                raise InvalidRequestError(
                    f"metadata of scene {row.index} of video {video_id} lacks {', '.join(missing)}"
                )
            params.append((vector, Jsonb(row.metadata), video_id, row.index))
        if not params:
            return
        with self._connect() as conn, conn.cursor() as cur:
            cur.executemany(
                "UPDATE video_scenes SET embedding_visual_clip = %s, visual_clip_metadata = %s,"
                ' updated_at = now() WHERE video_id = %s AND "index" = %s',
                params,
            )
            if cur.rowcount != len(params):
                raise NotFoundError(
                    f"only {cur.rowcount} of {len(params)} scenes of video {video_id} exist; nothing written"
                )

    def write_scene_embeddings(self, rows: Sequence[SceneEmbedding]) -> None:
        """Store embeddings of scenes of any videos in one transaction (one engine job's results).

        Validated before the first write; a failure rolls the whole job back, so a crash leaves the
        previous embeddings, and writing the same rows again changes nothing.
        """
        params = []
        for row in rows:
            vector = self._check_vector(row.vector, f"embedding of scene {row.scene_id}")
            missing = [key for key in METADATA_KEYS if key not in row.metadata]
            if missing:
                raise InvalidRequestError(f"metadata of scene {row.scene_id} lacks {', '.join(missing)}")
            params.append((vector, Jsonb(row.metadata), row.scene_id))
        if not params:
            return
        with self._connect() as conn, conn.cursor() as cur:
            cur.executemany(
                "UPDATE video_scenes SET embedding_visual_clip = %s, visual_clip_metadata = %s,"
                " updated_at = now() WHERE id = %s",
                params,
            )

    def iter_scenes_to_embed(
        self,
        model_version: str,
        *,
        video_ids: Sequence[str] | None = None,
        force: bool = False,
        page_size: int = 1000,
    ) -> Iterator[list[SceneToEmbed]]:
        """Pages of scenes with no embedding or one from another model version (``force``: every
        scene), of ``video_ids`` or the whole library, in (video, index) order.

        Keyset pagination: each page is one short query starting after the previous page's last
        scene, so memory holds one page whatever the library's size, and no transaction stays open
        while the caller works on a page (rows written meanwhile are simply not seen again).
        """
        after: tuple[str, int] = (str(uuid.UUID(int=0)), -1)
        while True:
            with self._connect(vectors=False) as conn:
                rows = conn.execute(
                    'SELECT id, video_id, "index", thumbnail_path, thumbnail_sha256,'
                    " visual_clip_metadata->>'embedded_at' AS embedded_at FROM video_scenes"
                    ' WHERE (video_id, "index") > (%(vid)s::uuid, %(idx)s)'
                    " AND (%(ids)s::uuid[] IS NULL OR video_id = ANY(%(ids)s::uuid[]))"
                    " AND (%(force)s OR embedding_visual_clip IS NULL"
                    "      OR visual_clip_metadata->>'model_version' IS DISTINCT FROM %(mv)s)"
                    ' ORDER BY video_id, "index" LIMIT %(limit)s',
                    {
                        "vid": after[0],
                        "idx": after[1],
                        "ids": list(video_ids) if video_ids is not None else None,
                        "force": force,
                        "mv": model_version,
                        "limit": page_size,
                    },
                ).fetchall()
            if not rows:
                return
            yield [
                SceneToEmbed(
                    id=str(r["id"]),
                    video_id=str(r["video_id"]),
                    index=r["index"],
                    thumbnail_path=r["thumbnail_path"],
                    thumbnail_sha256=r["thumbnail_sha256"],
                    embedded_at=float(r["embedded_at"]) if r["embedded_at"] is not None else None,
                )
                for r in rows
            ]
            after = (str(rows[-1]["video_id"]), rows[-1]["index"])

    def embedding_backlog(self, model_version: str, *, force: bool = False) -> Iterator[tuple[str, int]]:
        """(video id, scenes to embed) per video with work, streamed through a server-side cursor."""
        with self._connect(vectors=False) as conn, conn.cursor(name="backlog") as cur:
            cur.execute(
                "SELECT video_id, count(*) AS n FROM video_scenes"
                " WHERE %(force)s OR embedding_visual_clip IS NULL"
                "    OR visual_clip_metadata->>'model_version' IS DISTINCT FROM %(mv)s"
                " GROUP BY video_id ORDER BY video_id",
                {"force": force, "mv": model_version},
            )
            for row in cur:
                yield str(row["video_id"]), int(row["n"])

    def videos_needing_embeddings(self, model_version: str, video_ids: Sequence[str]) -> list[str]:
        """Those of ``video_ids`` with a scene that lacks a ``model_version`` embedding."""
        with self._connect(vectors=False) as conn:
            rows = conn.execute(
                "SELECT DISTINCT video_id FROM video_scenes WHERE video_id = ANY(%s::uuid[])"
                " AND (embedding_visual_clip IS NULL"
                "      OR visual_clip_metadata->>'model_version' IS DISTINCT FROM %s)",
                (list(video_ids), model_version),
            ).fetchall()
        return [str(row["video_id"]) for row in rows]

    def refresh_embedding_status(self, video_ids: Sequence[str], model_version: str) -> None:
        """Make each video's status say what its scenes hold: ``embedded`` when every scene has a
        ``model_version`` embedding, ``embedding_incomplete`` otherwise (videos with no scenes keep
        theirs)."""
        with self._connect(vectors=False) as conn:
            conn.execute(
                "UPDATE videos v SET status = CASE WHEN s.missing = 0 THEN 'embedded'"
                " ELSE 'embedding_incomplete' END,"
                " error = CASE WHEN s.missing = 0 THEN NULL ELSE s.missing || ' scene(s) without a CLIP"
                " embedding; run the backfill again' END, updated_at = now()"
                " FROM (SELECT video_id, count(*) FILTER (WHERE embedding_visual_clip IS NULL"
                "        OR visual_clip_metadata->>'model_version' IS DISTINCT FROM %s) AS missing"
                "       FROM video_scenes WHERE video_id = ANY(%s::uuid[]) GROUP BY video_id) s"
                " WHERE v.id = s.video_id",
                (model_version, list(video_ids)),
            )

    def cached_embeddings(
        self, sha256s: Sequence[str], model_version: str
    ) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """Embeddings already made by ``model_version`` for these thumbnail contents, from any video:
        the same frame is never sent to the GPU twice."""
        if not sha256s:
            return {}
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT DISTINCT ON (thumbnail_sha256) thumbnail_sha256, embedding_visual_clip,"
                " visual_clip_metadata FROM video_scenes"
                " WHERE thumbnail_sha256 = ANY(%s) AND embedding_visual_clip IS NOT NULL"
                " AND visual_clip_metadata->>'model_version' = %s"
                " ORDER BY thumbnail_sha256, updated_at DESC",
                (list(sha256s), model_version),
            ).fetchall()
        return {
            row["thumbnail_sha256"]: (
                row["embedding_visual_clip"].to_numpy(),
                row["visual_clip_metadata"],
            )
            for row in rows
        }

    def clear_embeddings(self, video_id: str | None = None) -> int:
        """Drop embeddings (of one video, or all) before a forced regeneration; returns scenes cleared."""
        with self._connect(vectors=False) as conn:
            cur = conn.execute(
                "UPDATE video_scenes SET embedding_visual_clip = NULL, visual_clip_metadata = NULL,"
                " updated_at = now() WHERE embedding_visual_clip IS NOT NULL"
                " AND (%(video_id)s::uuid IS NULL OR video_id = %(video_id)s)",
                {"video_id": video_id},
            )
            return cur.rowcount

    # ---------------------------------------------------------------------------------------- search
    def search(
        self,
        vector: Sequence[float] | np.ndarray,
        k: int = 10,
        video_id: str | None = None,
        *,
        user_id: str | None = None,
        model_version: str | None = None,
        ef_search: int = DEFAULT_EF_SEARCH,
    ) -> list[SearchHit]:
        """The ``k`` scenes closest by cosine, best first; score = 1 - cosine distance.

        ``user_id`` keeps to the scenes of that owner's videos (tenancy: a user's search never sees
        another's). HNSW returns at most ef_search candidates before filters; iterative scan keeps
        looking when a filter discards them, so a filtered search still fills ``k``.
        """
        query = self._check_vector(vector, "query vector")
        if not 1 <= k <= 1000:
            raise InvalidRequestError(f"k must be between 1 and 1000, got {k}")
        filtered = video_id is not None or model_version is not None or user_id is not None
        with self._connect() as conn:
            # Seq scans off: pgvector's cost model prices HNSW above a scan of tens of thousands of rows,
            # yet that scan detoasts every 2 KB vector (~50 ms at 20k rows against ~2 ms for the index).
            # A video filter still gets the (video_id, index) btree.
            conn.execute(
                "SELECT set_config('hnsw.ef_search', %s, true), set_config('hnsw.iterative_scan', %s, true),"
                " set_config('enable_seqscan', 'off', true)",
                (str(max(ef_search, k)), "strict_order" if filtered else "off"),
            )
            rows = conn.execute(
                'SELECT s.video_id, s.id, s."index", s.start_s, s.end_s, s.thumbnail_path, v.filename,'
                " v.storage_path AS video_path, s.embedding_visual_clip <=> %(q)s AS distance"
                " FROM video_scenes s JOIN videos v ON v.id = s.video_id"
                " WHERE s.embedding_visual_clip IS NOT NULL"
                " AND (%(video_id)s::uuid IS NULL OR s.video_id = %(video_id)s)"
                " AND (%(user_id)s::uuid IS NULL OR v.owner_id = %(user_id)s)"
                " AND (%(mv)s::text IS NULL OR s.visual_clip_metadata->>'model_version' = %(mv)s)"
                " ORDER BY s.embedding_visual_clip <=> %(q)s LIMIT %(k)s",
                {"q": query, "video_id": video_id, "user_id": user_id, "mv": model_version, "k": k},
            ).fetchall()
        return [
            SearchHit(
                video_id=str(row["video_id"]),
                scene_id=str(row["id"]),
                index=row["index"],
                start_s=row["start_s"],
                end_s=row["end_s"],
                thumbnail_path=row["thumbnail_path"],
                score=1.0 - float(row["distance"]),
                filename=row["filename"],
                video_path=row["video_path"],
            )
            for row in rows
        ]

    def video_visible(self, video_id: str, user_id: str | None) -> bool:
        """Whether ``video_id`` exists and, with ``user_id``, belongs to that user."""
        with self._connect(vectors=False) as conn:
            row = conn.execute(
                "SELECT 1 FROM videos WHERE id = %s AND (%s::uuid IS NULL OR owner_id = %s)",
                (video_id, user_id, user_id),
            ).fetchone()
        return row is not None

    def searchable_videos(self, user_id: str | None, limit: int = 1000) -> list[dict[str, Any]]:
        """``{id, filename, scenes}`` of the videos (of ``user_id``) with embedded scenes, by name."""
        with self._connect(vectors=False) as conn:
            return conn.execute(
                "SELECT v.id::text AS id, v.filename, count(*) AS scenes FROM videos v"
                " JOIN video_scenes s ON s.video_id = v.id AND s.embedding_visual_clip IS NOT NULL"
                " WHERE %(user_id)s::uuid IS NULL OR v.owner_id = %(user_id)s"
                " GROUP BY v.id ORDER BY v.filename, v.id LIMIT %(limit)s",
                {"user_id": user_id, "limit": limit},
            ).fetchall()
