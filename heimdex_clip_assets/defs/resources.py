"""Thin Dagster resources over the pipeline's adapters, configured by the typed settings.

Every field defaults to ``None``, meaning "take the guide's environment variable" (``DATABASE_URL``,
``SUPABASE_URL``, ``CLIP_INFERENCE_BACKEND``, ...), so switching embedded -> real services or
local -> RunPod needs no code change; a run's config in the launchpad can still override one run. Where
one of the fields' variables is set, the field is a ``dg.EnvVar``: the UI shows where the value comes
from, and never the value (``DATABASE_URL`` holds a password).
The heavy objects (the database connection info, the storage client, the CLIP model) are built once per
process by ``heimdex_clip_assets.services`` and shared by every step and run in it.
"""

import os

import dagster as dg
from pydantic import Field

from heimdex_clip_assets import services
from heimdex_clip_assets.adapters.clip_backends import ClipBackend, encoder_in_child
from heimdex_clip_assets.adapters.db import VectorStore
from heimdex_clip_assets.adapters.storage import Storage
from heimdex_clip_assets.config import Settings

from .run_health import reap_dead_runs, tag_run_worker


class VectorStoreResource(dg.ConfigurableResource):
    """PostgreSQL + pgvector: ``DATABASE_URL``, or the embedded server under ``HEIMDEX_HOME``."""

    database_url: str | None = Field(default=None, description="Overrides DATABASE_URL for this run.")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Every run needs the database, and sets it up before any step asks for a clip_inference slot:
        # the place to record this run's process and free what dead runs hold (see run_health).
        if context.run is not None and context.instance is not None:
            tag_run_worker(context.instance, context.run.run_id)
            reap_dead_runs(context.instance)

    def get(self) -> VectorStore:
        settings = Settings.from_env()
        if self.database_url:
            settings = settings.replace(database_url=self.database_url)
        return services.vector_store(settings)


class StorageResource(dg.ConfigurableResource):
    """Supabase Storage (``SUPABASE_URL``), or the embedded Supabase-compatible server."""

    bucket: str | None = Field(default=None, description="Overrides SUPABASE_BUCKET for this run.")
    signed_url_expires_s: int | None = Field(
        default=None, description="Overrides SIGNED_URL_EXPIRES_S (default 300) for this run."
    )

    def settings(self) -> Settings:
        settings = Settings.from_env()
        if self.bucket:
            settings = settings.replace(bucket=self.bucket)
        if self.signed_url_expires_s:
            settings = settings.replace(signed_url_expires_s=self.signed_url_expires_s)
        return settings

    def get(self) -> Storage:
        return services.storage(self.settings())


class ClipInferenceResource(dg.ConfigurableResource):
    """Where CLIP runs: ``runpod`` (GPU worker), ``local`` (in-process CPU) or ``off``.

    Chosen by ``CLIP_INFERENCE_BACKEND`` (``CLIP_ENABLED=false`` also means off), with the guide's
    ``RUNPOD_*``, ``EMBEDDING_HMAC_SECRET`` and ``CLIP_MODEL_*`` variables. It holds the storage resource:
    the RunPod worker fetches thumbnails through signed URLs made there.
    """

    storage: StorageResource
    backend: str | None = Field(default=None, description="Overrides CLIP_INFERENCE_BACKEND for this run.")

    def settings(self) -> Settings:
        return Settings.from_env(backend=self.backend)

    def get(self) -> ClipBackend:
        return services.clip_backend(self.settings(), self.storage.get())

    def preload(self) -> None:
        """Start loading the in-process model (local backend) without waiting for it."""
        services.preload_encoder(self.settings())

    def model_in_child(self) -> bool:
        """Whether the local model loads in a child process (the demo's), holding no GIL here."""
        return encoder_in_child(self.settings())


def _env_var(name: str) -> dg.EnvVar | None:
    """``dg.EnvVar(name)`` where the variable is set, else ``None`` (the typed settings' default)."""
    return dg.EnvVar(name) if os.environ.get(name, "").strip() else None


@dg.definitions
def resources() -> dg.Definitions:
    # One video per run and one process per run: the multiprocess executor would add ~3 s per step for
    # no gain. Runs for different videos still overlap, up to the run queue's limit.
    storage = StorageResource(bucket=_env_var("SUPABASE_BUCKET"))
    return dg.Definitions(
        resources={
            "db": VectorStoreResource(database_url=_env_var("DATABASE_URL")),
            "storage": storage,
            "clip": ClipInferenceResource(storage=storage, backend=_env_var("CLIP_INFERENCE_BACKEND")),
        },
        executor=dg.in_process_executor,
    )
