"""The vector store: the seed system's ``videos`` and ``video_scenes`` tables, plus the project's own
bookkeeping in schema ``heimdex_clip``, in PostgreSQL + pgvector.

One code path serves two databases: the seed system's own (Supabase, its worker's rows, RLS on) and a
fresh one (the embedded default, any empty PostgreSQL), which the migrations give the same shape for
the tables the two share. On the seed's tables the project writes only what it owns: the two CLIP
columns of every scene, and the rows (and ``videos.status``) of videos it registered itself. Everything
else it keeps in ``heimdex_clip.videos`` (registration, progress) and ``heimdex_clip.scenes``
(thumbnail hash, keyframe time).

With ``DATABASE_URL`` unset, ``services`` points it at an embedded PostgreSQL under ``HEIMDEX_HOME``.
Every method opens a short connection: unix-socket connects cost about a millisecond, and no connection
outlives a call, so a store can be shared by threads and handed to forked processes.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any
from urllib.parse import unquote

import numpy as np
import psycopg
from pgvector.psycopg.vector import register_vector_info
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types import TypeInfo
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from heimdex_clip_contract.errors import DatabaseError, InvalidRequestError, ModelMismatchError, NotFoundError

# Any constant works; it only has to be the same in every process that migrates this database.
_MIGRATION_LOCK_KEY = 0x4845_494D_4445_58
SCHEMA = "heimdex_clip"
# Keys every embedding's metadata carries: the seed system's documented ones (its app reads them), the
# guide's backend (its monitoring SQL), and ours (staleness compares model_version).
METADATA_KEYS: tuple[str, ...] = (
    "model_name",
    "pretrained",
    "embed_dim",
    "normalized",
    "device",
    "inference_time_ms",
    "created_at",
    "error",
    "backend",
    "model_version",
    "cache_hit",
    "batch_size",
)
# Dagster's run, event and schedule storage (and its alembic marker): on the embedded default it shares
# this database, so these tables do not make a database "another system's".
DAGSTER_TABLES = (
    "alembic_version", "asset_check_executions", "asset_daemon_asset_evaluations", "asset_event_tags",
    "asset_keys", "backfill_tags", "bulk_actions", "concurrency_limits", "concurrency_slots",
    "daemon_heartbeats", "dynamic_partitions", "event_logs", "instance_info", "instigators", "job_ticks",
    "jobs", "kvs", "pending_steps", "run_tags", "runs", "secondary_indexes", "snapshots",
)  # fmt: skip
# ef_search 100 gives recall@10 >= 0.95 on 100k vectors in the bench at ~1-3 ms per query.
DEFAULT_EF_SEARCH = 100
# A held connection idle longer than this is checked before use (servers and poolers drop idle ones).
HELD_CHECK_AFTER_S = 30.0
# The project's progress per video (heimdex_clip.videos.state), and the seed's video_status each gives a
# video the project registered itself: that system's app shows READY videos, so READY means every scene
# has its CLIP embedding.
VIDEO_STATUS = {
    "registered": "PENDING",
    "scenes_ready": "PROCESSING",
    "embedding_incomplete": "PROCESSING",
    "embedded": "READY",
    "failed": "FAILED",
}


@dataclass
class VideoRecord:
    """A ``videos`` row, with the project's bookkeeping (``registered``, ``state``, ``error``) beside it."""

    id: str
    owner_id: str
    storage_path: str
    filename: str | None = None
    duration_s: float | None = None
    frame_rate: float | None = None
    width: int | None = None
    height: int | None = None
    status: str = "PENDING"  # the seed's video_status
    error_message: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    registered: bool = False  # True: the project registered it, and so owns its row and status
    state: str | None = None  # one of VIDEO_STATUS; None for a video the project has not worked on
    error: str | None = None


@dataclass
class SceneRecord:
    """One ``video_scenes`` row. ``keyframe_s``/``thumbnail_sha256`` exist only for scenes the project
    detected; ``id`` is assigned by the database; ``embedding``/``metadata`` are set by
    :meth:`VectorStore.write_embeddings` only."""

    index: int
    start_s: float
    end_s: float
    thumbnail_url: str | None = None
    keyframe_s: float | None = None
    thumbnail_sha256: str | None = None
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
    owner_id: str
    scene_id: str
    index: int
    start_s: float
    end_s: float
    thumbnail_url: str | None
    score: float
    filename: str | None = None
    video_path: str | None = None  # the video's storage path


def storage_path_of(thumbnail_url: str) -> str:
    """The object path a public-form ``thumbnail_url`` names, split as the seed's backfill splits it
    (``.../storage/v1/object/public/<bucket>/<path>``); another form comes back whole."""
    _, found, rest = thumbnail_url.partition("/storage/v1/object/public/")
    if not found or "/" not in rest:
        return thumbnail_url
    return unquote(rest.split("/", 1)[1].split("?", 1)[0])


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
        self._held = threading.local()  # a thread's connection while it is inside holding_connection()

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
    def holding_connection(self) -> Iterator[None]:
        """Within the block, this thread's calls share one connection (a transaction each) instead of
        opening one per call: a busy thread, such as an engine's writer, pays no connect per job (a
        TLS handshake and authentication on a hosted database, a server process on any). A lost
        connection is replaced on the next call."""
        if self._pool is not None or getattr(self._held, "active", False):
            yield  # a pool already reuses connections; an outer block already holds one
            return
        self._held.active = True
        try:
            yield
        finally:
            self._held.active = False
            conn, self._held.conn = getattr(self._held, "conn", None), None
            if conn is not None:
                conn.close()

    @contextmanager
    def _connect(self, *, vectors: bool = True) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """A connection in a transaction (committed on success), with database errors made typed."""
        try:
            if self._pool is not None:
                with self._pool.connection() as conn:
                    yield conn
            elif getattr(self._held, "active", False):
                with self._held_connection() as conn:
                    yield conn
            else:
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
            raise DatabaseError(
                f"{self._where()} lacks a table the project needs ({str(exc).splitlines()[0]}); point "
                "DATABASE_URL at the Heimdex database, or at an empty one the project may set up"
            ) from exc
        except psycopg.Error as exc:
            raise DatabaseError(f"database error ({self._where()}): {str(exc).strip()}") from exc

    @contextmanager
    def _held_connection(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        conn = getattr(self._held, "conn", None)
        if (
            conn is not None
            and conn.info.transaction_status == TransactionStatus.IDLE  # not inside an outer call's
            and time.monotonic() - self._held.used > HELD_CHECK_AFTER_S
        ):
            try:  # idle a while: a server or pooler may have dropped it since
                conn.execute("SELECT 1")
                conn.commit()
            except psycopg.Error:
                conn.close()
        if conn is None or conn.closed:
            conn = self._held.conn = psycopg.connect(self.dsn, row_factory=dict_row, connect_timeout=10)
            self._register_vector(conn)
            conn.commit()  # idle between calls, not inside the type lookup's transaction
        try:
            with conn.transaction():
                yield conn
        except psycopg.OperationalError:
            conn.close()  # lost or broken: the next call connects afresh
            self._held.conn = None
            raise
        finally:
            self._held.used = time.monotonic()

    def _register_vector(self, conn: psycopg.Connection[Any]) -> None:
        if self._vector_type is None:
            self._vector_type = TypeInfo.fetch(conn, "vector")
            if self._vector_type is None:
                raise DatabaseError(f"pgvector is not installed in {self._where()}; run migrations first")
        register_vector_info(conn, self._vector_type)

    def _check_vector(self, vector: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
        return self._check_vectors([vector], lambda _: what)[0]

    def _check_vectors(
        self, vectors: Sequence[Sequence[float] | np.ndarray], what: Callable[[int], str]
    ) -> np.ndarray:
        """A write's vectors as one (n, dim) float32 matrix, their values checked in one pass (a
        job's 256 checks one at a time cost more than the arithmetic); ``what(i)`` names vector i."""
        arrays = [np.asarray(vector, dtype=np.float32) for vector in vectors]
        for i, arr in enumerate(arrays):
            if arr.shape != (self.dim,):
                raise ModelMismatchError(
                    f"{what(i)} has shape {arr.shape}, but the store holds {self.dim}-dimensional "
                    "embeddings; check CLIP_MODEL_NAME"
                )
        matrix = np.stack(arrays) if arrays else np.zeros((0, self.dim), dtype=np.float32)
        finite = np.isfinite(matrix).all(axis=1)
        if not finite.all():
            raise InvalidRequestError(f"{what(int(np.argmin(finite)))} holds NaN or infinite values")
        return matrix

    # ---------------------------------------------------------------------------------------- schema
    def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied (empty when up to date).

        Additive only: tables, columns, indexes and functions are created where missing, never dropped,
        renamed or retyped, and no existing row is rewritten. An advisory lock held for the transaction
        serialises processes migrating at once: the second waits, then finds nothing to do.
        Raises :class:`ModelMismatchError` when ``embedding_visual_clip`` has another width than the
        configured model, and :class:`DatabaseError` for a database that is neither empty nor Heimdex's.
        """
        applied = []
        with self._connect(vectors=False) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
            self._check_database(conn)
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {SCHEMA}.settings (key text PRIMARY KEY, value text NOT NULL)"
            )
            done = {row["version"] for row in conn.execute(f"SELECT version FROM {SCHEMA}.schema_migrations")}
            for version, name, sql in _migrations():
                if version in done:
                    continue
                conn.execute(sql.replace("{dim}", str(self.dim)))
                conn.execute(
                    f"INSERT INTO {SCHEMA}.schema_migrations (version, name) VALUES (%s, %s)", (version, name)
                )
                applied.append(version)
        return applied

    def _check_database(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        """Refuse, before any change, what the migrations must not touch."""
        row = conn.execute(
            "SELECT to_regclass('public.videos') IS NOT NULL AS videos,"
            " to_regclass('public.video_scenes') IS NOT NULL AS scenes,"
            " (SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            "  AND tablename <> ALL(%s)) AS tables,"
            " (SELECT atttypmod FROM pg_attribute WHERE attrelid = to_regclass('public.video_scenes')"
            "  AND attname = 'embedding_visual_clip' AND NOT attisdropped) AS clip_dim,"
            " EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('public.videos')"
            "  AND attname = 'owner_id' AND NOT attisdropped) AS has_owner",
            (list(DAGSTER_TABLES),),
        ).fetchone()
        assert row is not None
        if row["videos"] != row["scenes"] or (row["videos"] and not row["has_owner"]):
            raise DatabaseError(
                f"{self._where()} has a videos/video_scenes pair that is not the Heimdex layout (an older "
                "heimdex-clip database, or another system's); point DATABASE_URL at the Heimdex database "
                "or an empty one"
            )
        if not row["videos"] and row["tables"]:
            raise DatabaseError(
                f"{self._where()} has no videos and video_scenes tables but holds {row['tables']} other "
                "table(s); point DATABASE_URL at the Heimdex database, or at an empty database to start one"
            )
        if row["clip_dim"] is not None and row["clip_dim"] != self.dim:
            raise ModelMismatchError(
                f"video_scenes.embedding_visual_clip holds {row['clip_dim']}-dimensional vectors but the "
                f"configured model makes {self.dim}; use a model of that width (CLIP_MODEL_NAME) or "
                "another database (DATABASE_URL)"
            )

    # ---------------------------------------------------------------------------------------- owners
    def ensure_owner(self, owner_id: str) -> None:
        """Make sure ``owner_id`` may own videos: an existing user of ``auth.users``, or, where that table
        is the project's local stand-in (a plain PostgreSQL), a new local user."""
        with self._connect(vectors=False) as conn:
            local = conn.execute(
                f"SELECT 1 FROM {SCHEMA}.settings WHERE key = 'local_auth_users' AND value = 'true'"
            ).fetchone()
            if local:
                conn.execute("INSERT INTO auth.users (id) VALUES (%s) ON CONFLICT DO NOTHING", (owner_id,))
            elif conn.execute("SELECT 1 FROM auth.users WHERE id = %s", (owner_id,)).fetchone() is None:
                raise NotFoundError(
                    f"owner {owner_id} is not a user of this database (auth.users); pass the id of an "
                    "existing user with --owner-id or HEIMDEX_OWNER_ID"
                )

    # ---------------------------------------------------------------------------------------- videos
    _VIDEO_SELECT = (
        "SELECT v.id, v.owner_id, v.storage_path, v.filename, v.duration_s, v.frame_rate, v.width,"
        " v.height, v.status::text AS status, v.error_message, v.created_at, v.updated_at,"
        f" coalesce(p.registered, false) AS registered, p.state, p.error"
        f" FROM public.videos v LEFT JOIN {SCHEMA}.videos p ON p.video_id = v.id"
    )

    @staticmethod
    def _video(row: dict[str, Any]) -> VideoRecord:
        return VideoRecord(**{**row, "id": str(row["id"]), "owner_id": str(row["owner_id"])})

    def add_video(self, video: VideoRecord) -> bool:
        """Insert a video the project registers (its row and status are then the project's); returns
        False, changing nothing, when a video with that id exists."""
        with self._connect(vectors=False) as conn:
            cur = conn.execute(
                "INSERT INTO public.videos (id, owner_id, storage_path, filename, duration_s, frame_rate,"
                " width, height, status) VALUES (%(id)s, %(owner_id)s, %(storage_path)s, %(filename)s,"
                " %(duration_s)s, %(frame_rate)s, %(width)s, %(height)s, %(status)s::video_status)"
                " ON CONFLICT (id) DO NOTHING",
                video.__dict__,
            )
            if cur.rowcount == 0:
                return False
            conn.execute(
                f"INSERT INTO {SCHEMA}.videos (video_id, registered, state) VALUES (%s, true, 'registered')",
                (video.id,),
            )
            return True

    def update_video_info(
        self, video_id: str, *, duration_s: float, frame_rate: float, width: int, height: int
    ) -> None:
        """Record what decoding found, on a video the project registered (never on another's row)."""
        with self._connect(vectors=False) as conn:
            conn.execute(
                "UPDATE public.videos v SET duration_s = %s, frame_rate = %s, width = %s, height = %s"
                f" FROM {SCHEMA}.videos p WHERE v.id = %s AND p.video_id = v.id AND p.registered"
                " AND (v.duration_s, v.frame_rate, v.width, v.height) IS DISTINCT FROM (%s, %s, %s, %s)",
                (duration_s, frame_rate, width, height, video_id, duration_s, frame_rate, width, height),
            )

    def get_video(self, video_id: str) -> VideoRecord | None:
        with self._connect(vectors=False) as conn:
            row = conn.execute(f"{self._VIDEO_SELECT} WHERE v.id = %s", (video_id,)).fetchone()
        return None if row is None else self._video(row)

    def videos_registered_after(self, cursor: str | None, limit: int) -> list[RegisteredVideo]:
        """Videos (the project's and the seed system's) created after ``cursor`` (a previous result's
        ``.cursor``), oldest first. Ordered by (created_at, id) so ties neither repeat nor skip a video."""
        created_at, last_id = cursor.split("|", 1) if cursor else ("-infinity", str(uuid.UUID(int=0)))
        with self._connect(vectors=False) as conn:
            rows = conn.execute(
                "SELECT id, created_at FROM public.videos"
                " WHERE (created_at, id) > (%s::timestamptz, %s::uuid) ORDER BY created_at, id LIMIT %s",
                (created_at, last_id, limit),
            ).fetchall()
        return [RegisteredVideo(str(r["id"]), f"{r['created_at'].isoformat()}|{r['id']}") for r in rows]

    def videos_done(self, video_ids: Sequence[str], model_version: str) -> set[str]:
        """Those of ``video_ids`` whose scenes exist and all (those with a thumbnail) carry a
        ``model_version`` embedding."""
        with self._connect(vectors=False) as conn:
            rows = conn.execute(
                "SELECT video_id FROM public.video_scenes WHERE video_id = ANY(%s::uuid[]) GROUP BY video_id"
                " HAVING count(*) FILTER (WHERE thumbnail_url IS NOT NULL AND (embedding_visual_clip IS NULL"
                "        OR visual_clip_metadata->>'model_version' IS DISTINCT FROM %s)) = 0",
                (list(video_ids), model_version),
            ).fetchall()
        return {str(row["video_id"]) for row in rows}

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        """Rows of a read-only SQL statement, e.g. the README's monitoring queries."""
        with self._connect() as conn:
            return conn.execute(sql, params).fetchall()

    def set_video_state(self, video_id: str, state: str, error: str | None = None) -> None:
        """Record the project's progress on a video. On a video the project registered, ``videos.status``
        (and ``error_message``) follow it (:data:`VIDEO_STATUS`); another's video keeps its status."""
        if state not in VIDEO_STATUS:
            raise InvalidRequestError(f"unknown video state {state!r}; use one of {', '.join(VIDEO_STATUS)}")
        with self._connect(vectors=False) as conn:
            if conn.execute("SELECT 1 FROM public.videos WHERE id = %s", (video_id,)).fetchone() is None:
                raise NotFoundError(f"video {video_id} is not in the videos table")
            (row,) = conn.execute(
                f"INSERT INTO {SCHEMA}.videos AS p (video_id, state, error) VALUES (%s, %s, %s)"
                " ON CONFLICT (video_id) DO UPDATE SET state = EXCLUDED.state, error = EXCLUDED.error,"
                " updated_at = now() RETURNING registered",
                (video_id, state, error),
            ).fetchall()
            if row["registered"]:
                status = VIDEO_STATUS[state]
                conn.execute(
                    "UPDATE public.videos SET status = %s::video_status, error_message = %s"
                    " WHERE id = %s AND (status::text, error_message) IS DISTINCT FROM (%s, %s)",
                    (status, error, video_id, status, error),
                )

    # ---------------------------------------------------------------------------------------- scenes
    def insert_scenes(self, video_id: str, scenes: Sequence[SceneRecord]) -> int:
        """Give a video without scenes these ones, in one transaction; returns how many were inserted.

        Scenes that exist are never replaced: if the video has any (the seed system's worker, or an
        earlier run, made them), nothing is written and 0 is returned. A per-video advisory lock, not a
        row lock on ``videos``, serialises two runs of one video.
        """
        indexes = [scene.index for scene in scenes]
        if len(set(indexes)) != len(indexes):
            raise InvalidRequestError(f"scenes of video {video_id} repeat an index")
        if any(s.keyframe_s is None or s.thumbnail_sha256 is None for s in scenes):
            raise InvalidRequestError(f"new scenes of video {video_id} need keyframe_s and thumbnail_sha256")
        with self._connect(vectors=False) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"scenes:{video_id}",))
            if conn.execute("SELECT 1 FROM public.videos WHERE id = %s", (video_id,)).fetchone() is None:
                raise NotFoundError(f"video {video_id} is not in the videos table; register it first")
            if conn.execute(
                "SELECT 1 FROM public.video_scenes WHERE video_id = %s LIMIT 1", (video_id,)
            ).fetchone():
                return 0
            ordered = sorted(scenes, key=lambda s: s.index)
            ids = conn.execute(
                'INSERT INTO public.video_scenes (video_id, "index", start_s, end_s, thumbnail_url)'
                " SELECT %s, * FROM unnest(%s::int[], %s::float8[], %s::float8[], %s::text[])"
                ' RETURNING id, "index"',
                (
                    video_id,
                    [s.index for s in ordered],
                    [s.start_s for s in ordered],
                    [s.end_s for s in ordered],
                    [s.thumbnail_url for s in ordered],
                ),
            ).fetchall()
            by_index = {row["index"]: row["id"] for row in ids}
            conn.execute(
                f"INSERT INTO {SCHEMA}.scenes (video_id, scene_id, keyframe_s, thumbnail_sha256)"
                " SELECT %s, * FROM unnest(%s::uuid[], %s::float8[], %s::text[])",
                (
                    video_id,
                    [by_index[s.index] for s in ordered],
                    [s.keyframe_s for s in ordered],
                    [s.thumbnail_sha256 for s in ordered],
                ),
            )
            return len(ordered)

    _SCENE_SELECT = (
        'SELECT s.id, s.video_id, s."index", s.start_s, s.end_s, s.thumbnail_url, p.keyframe_s,'
        " p.thumbnail_sha256, s.embedding_visual_clip, s.visual_clip_metadata"
        f" FROM public.video_scenes s LEFT JOIN {SCHEMA}.scenes p ON p.scene_id = s.id"
    )

    @staticmethod
    def _scene(row: dict[str, Any]) -> SceneRecord:
        embedding = row["embedding_visual_clip"]
        return SceneRecord(
            index=row["index"],
            start_s=row["start_s"],
            end_s=row["end_s"],
            thumbnail_url=row["thumbnail_url"],
            keyframe_s=row["keyframe_s"],
            thumbnail_sha256=row["thumbnail_sha256"],
            id=str(row["id"]),
            video_id=str(row["video_id"]),
            embedding=None if embedding is None else embedding.to_numpy(),
            metadata=row["visual_clip_metadata"],
        )

    def scenes(self, video_id: str) -> list[SceneRecord]:
        with self._connect() as conn:
            rows = conn.execute(
                f'{self._SCENE_SELECT} WHERE s.video_id = %s ORDER BY s."index"', (video_id,)
            ).fetchall()
        return [self._scene(row) for row in rows]

    def count_scenes_without_thumbnail(self, video_id: str | None = None) -> int:
        """Scenes that cannot be embedded because they have no ``thumbnail_url``."""
        with self._connect(vectors=False) as conn:
            row = conn.execute(
                "SELECT count(*) AS n FROM public.video_scenes WHERE thumbnail_url IS NULL"
                " AND (%(video_id)s::uuid IS NULL OR video_id = %(video_id)s)",
                {"video_id": video_id},
            ).fetchone()
        return int(row["n"]) if row else 0

    # ------------------------------------------------------------------------------------ embeddings
    def write_embeddings(self, video_id: str, rows: Sequence[EmbeddingRow]) -> None:
        """Store embeddings for scenes of one video in one transaction, touching only the two CLIP
        columns (the seed's table has no ``updated_at``, and every other column is that system's).

        Everything is validated before the first write, and any failure rolls the whole batch back, so
        a crash leaves the previous embeddings; writing the same rows again changes nothing.
        """
        values = self._embedding_values(rows, lambda row: f"scene {row.index} of video {video_id}")
        params = [(*value, video_id, row.index) for value, row in zip(values, rows, strict=True)]
        if not params:
            return
        with self._connect() as conn, conn.cursor() as cur:
            cur.executemany(
                "UPDATE public.video_scenes SET embedding_visual_clip = %s, visual_clip_metadata = %s"
                ' WHERE video_id = %s AND "index" = %s',
                params,
            )
            if cur.rowcount != len(params):
                raise NotFoundError(
                    f"only {cur.rowcount} of {len(params)} scenes of video {video_id} exist; nothing written"
                )

    def _embedding_values(
        self, rows: Sequence[EmbeddingRow] | Sequence[SceneEmbedding], name: Callable[[Any], str]
    ) -> list[tuple[np.ndarray, Jsonb]]:
        """Each row's vector and metadata as written, all of them checked before the first write;
        ``name(row)`` says which scene a row is, for messages."""
        matrix = self._check_vectors([row.vector for row in rows], lambda i: f"embedding of {name(rows[i])}")
        for row in rows:
            missing = [key for key in METADATA_KEYS if key not in row.metadata]
            if missing:
                raise InvalidRequestError(f"metadata of {name(row)} lacks {', '.join(missing)}")
        return [(vector, Jsonb(row.metadata)) for vector, row in zip(matrix, rows, strict=True)]

    def write_scene_embeddings(self, rows: Sequence[SceneEmbedding]) -> None:
        """Store embeddings of scenes of any videos in one transaction (one engine job's results),
        touching only the two CLIP columns.

        Validated before the first write; a failure rolls the whole job back, so a crash leaves the
        previous embeddings, and writing the same rows again changes nothing.
        """
        values = self._embedding_values(rows, lambda row: f"scene {row.scene_id}")
        params = [(*value, row.scene_id) for value, row in zip(values, rows, strict=True)]
        if not params:
            return
        with self._connect() as conn, conn.cursor() as cur:
            cur.executemany(
                "UPDATE public.video_scenes SET embedding_visual_clip = %s, visual_clip_metadata = %s"
                " WHERE id = %s",
                params,
            )

    # A scene is to embed when it has a thumbnail and no embedding, or one of another model version.
    _TO_EMBED = (
        "s.thumbnail_url IS NOT NULL AND (%(force)s OR s.embedding_visual_clip IS NULL"
        " OR s.visual_clip_metadata->>'model_version' IS DISTINCT FROM %(mv)s)"
    )

    def iter_scenes_to_embed(
        self,
        model_version: str,
        *,
        video_ids: Sequence[str] | None = None,
        force: bool = False,
        page_size: int = 1000,
    ) -> Iterator[list[SceneToEmbed]]:
        """Pages of scenes with a thumbnail and no embedding or one from another model version
        (``force``: every scene with a thumbnail), of ``video_ids`` or the whole library, in (video,
        index) order. Scenes without a thumbnail cannot be embedded: see
        :meth:`count_scenes_without_thumbnail`.

        ``thumbnail_path`` is read from ``thumbnail_url`` as the seed system's own backfill does (the
        part after ``/storage/v1/object/public/<bucket>/``); a URL of another form is passed on whole,
        and fails that scene alone when it is signed or downloaded.

        Keyset pagination: each page is one short query starting after the previous page's last
        scene, so memory holds one page whatever the library's size, and no transaction stays open
        while the caller works on a page.
        """
        after: tuple[str, int] = (str(uuid.UUID(int=0)), -1)
        while True:
            with self._connect(vectors=False) as conn:
                rows = conn.execute(
                    'SELECT s.id, s.video_id, s."index", s.thumbnail_url, p.thumbnail_sha256,'
                    " s.visual_clip_metadata->>'embedded_at' AS embedded_at"
                    f" FROM public.video_scenes s LEFT JOIN {SCHEMA}.scenes p ON p.scene_id = s.id"
                    ' WHERE (s.video_id, s."index") > (%(vid)s::uuid, %(idx)s)'
                    " AND (%(ids)s::uuid[] IS NULL OR s.video_id = ANY(%(ids)s::uuid[]))"
                    f" AND {self._TO_EMBED}"
                    ' ORDER BY s.video_id, s."index" LIMIT %(limit)s',
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
                    thumbnail_path=storage_path_of(r["thumbnail_url"]),
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
                f"SELECT s.video_id, count(*) AS n FROM public.video_scenes s WHERE {self._TO_EMBED}"
                " GROUP BY s.video_id ORDER BY s.video_id",
                {"force": force, "mv": model_version},
            )
            for row in cur:
                yield str(row["video_id"]), int(row["n"])

    def videos_needing_embeddings(self, model_version: str, video_ids: Sequence[str]) -> list[str]:
        """Those of ``video_ids`` with a scene (with a thumbnail) that lacks a ``model_version`` embedding."""
        with self._connect(vectors=False) as conn:
            rows = conn.execute(
                "SELECT DISTINCT s.video_id FROM public.video_scenes s"
                f" WHERE s.video_id = ANY(%(ids)s::uuid[]) AND {self._TO_EMBED}",
                {"ids": list(video_ids), "force": False, "mv": model_version},
            ).fetchall()
        return [str(row["video_id"]) for row in rows]

    def refresh_embedding_status(self, video_ids: Sequence[str], model_version: str) -> None:
        """Make each video's state say what its scenes hold: ``embedded`` when every scene with a
        thumbnail has a ``model_version`` embedding (a video the project registered becomes READY),
        ``embedding_incomplete`` otherwise. Videos with no scenes keep theirs."""
        with self._connect(vectors=False) as conn:
            rows = conn.execute(
                f"SELECT s.video_id, count(*) FILTER (WHERE {self._TO_EMBED}) AS missing"
                " FROM public.video_scenes s WHERE s.video_id = ANY(%(ids)s::uuid[]) GROUP BY s.video_id",
                {"ids": list(video_ids), "force": False, "mv": model_version},
            ).fetchall()
        for row in rows:
            missing = int(row["missing"])
            if missing == 0:
                self.set_video_state(str(row["video_id"]), "embedded")
            else:
                self.set_video_state(
                    str(row["video_id"]),
                    "embedding_incomplete",
                    f"{missing} scene(s) without a CLIP embedding; run the backfill again",
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
                "SELECT DISTINCT ON (p.thumbnail_sha256) p.thumbnail_sha256, s.embedding_visual_clip,"
                f" s.visual_clip_metadata FROM {SCHEMA}.scenes p"
                " JOIN public.video_scenes s ON s.id = p.scene_id"
                " WHERE p.thumbnail_sha256 = ANY(%s) AND s.embedding_visual_clip IS NOT NULL"
                " AND s.visual_clip_metadata->>'model_version' = %s"
                " ORDER BY p.thumbnail_sha256, s.visual_clip_metadata->>'created_at' DESC",
                (list(sha256s), model_version),
            ).fetchall()
        return {
            row["thumbnail_sha256"]: (row["embedding_visual_clip"].to_numpy(), row["visual_clip_metadata"])
            for row in rows
        }

    def clear_embeddings(self, video_id: str | None = None) -> int:
        """Drop embeddings (of one video, or all) before a forced regeneration; returns scenes cleared."""
        with self._connect(vectors=False) as conn:
            cur = conn.execute(
                "UPDATE public.video_scenes SET embedding_visual_clip = NULL, visual_clip_metadata = NULL"
                " WHERE embedding_visual_clip IS NOT NULL"
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

        ``user_id`` keeps to that owner's videos, as the seed's ``filter_user_id`` does (a user's search
        never sees another's). HNSW returns
        at most ef_search candidates before filters; iterative scan keeps looking when a filter
        discards them, so a filtered search still fills ``k``.
        """
        query = self._check_vector(vector, "query vector")
        if not 1 <= k <= 1000:
            raise InvalidRequestError(f"k must be between 1 and 1000, got {k}")
        filtered = video_id is not None or model_version is not None or user_id is not None
        with self._connect() as conn:
            # Seq scans off: pgvector's cost model prices HNSW above a scan of tens of thousands of rows,
            # yet that scan detoasts every 2 KB vector (~50 ms at 20k rows against ~2 ms for the index).
            conn.execute(
                "SELECT set_config('hnsw.ef_search', %s, true), set_config('hnsw.iterative_scan', %s, true),"
                " set_config('enable_seqscan', 'off', true)",
                (str(max(ef_search, k)), "strict_order" if filtered else "off"),
            )
            rows = conn.execute(
                'SELECT s.video_id, v.owner_id, s.id, s."index", s.start_s, s.end_s, s.thumbnail_url,'
                " v.filename, v.storage_path AS video_path, s.embedding_visual_clip <=> %(q)s AS distance"
                " FROM public.video_scenes s JOIN public.videos v ON v.id = s.video_id"
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
                owner_id=str(row["owner_id"]),
                scene_id=str(row["id"]),
                index=row["index"],
                start_s=row["start_s"],
                end_s=row["end_s"],
                thumbnail_url=row["thumbnail_url"],
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
                "SELECT 1 FROM public.videos WHERE id = %s AND (%s::uuid IS NULL OR owner_id = %s)",
                (video_id, user_id, user_id),
            ).fetchone()
        return row is not None

    def searchable_videos(self, user_id: str | None, limit: int = 1000) -> list[dict[str, Any]]:
        """``{id, filename, scenes}`` of the videos (of ``user_id``) with embedded scenes, by name."""
        with self._connect(vectors=False) as conn:
            return conn.execute(
                "SELECT v.id::text AS id, v.filename, count(*) AS scenes FROM public.videos v"
                " JOIN public.video_scenes s ON s.video_id = v.id AND s.embedding_visual_clip IS NOT NULL"
                " WHERE %(user_id)s::uuid IS NULL OR v.owner_id = %(user_id)s"
                " GROUP BY v.id ORDER BY v.filename, v.id LIMIT %(limit)s",
                {"user_id": user_id, "limit": limit},
            ).fetchall()
