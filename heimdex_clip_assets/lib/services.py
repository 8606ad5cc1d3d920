"""One instance per process of each service object, keyed by the settings that made it.

Dagster builds resources per step and the CLI per command; both come here, so the CLIP model loads
once per process, the embedded servers are found once, and migrations run once.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import TYPE_CHECKING

from .clip_backends import ClipBackend, make_backend, settings_encoder
from .config import Settings
from .db import VectorStore, resolve_database_url
from .embedded import embedded_postgres
from .errors import ClipError
from .storage import Storage, open_storage
from .storage_server import stop_storage_server

if TYPE_CHECKING:  # importing the encoder imports torch (~4 s): only what embeds should pay for it
    from runpod_worker.encoder import ClipEncoder


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


def preload_encoder(settings: Settings) -> None:
    """Import torch and load the local backend's model in a background thread; whoever needs it next
    finds it loaded, or waits on the same lock."""
    if settings.clip_backend != "local":
        return

    def load() -> None:
        # A failure here is raised again, as a one-line error, by the step that needs the model.
        with contextlib.suppress(ClipError):
            settings_encoder(settings)

    threading.Thread(target=load, name="clip-preload", daemon=True).start()


def stop_embedded(settings: Settings) -> None:
    """Stop the embedded storage server and Postgres of ``settings.home`` (the next use restarts them)."""
    if settings.embedded_storage:
        stop_storage_server(settings.home)
    if settings.embedded_db:
        embedded_postgres(settings.home).stop()
