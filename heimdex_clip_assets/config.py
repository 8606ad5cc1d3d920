"""The pipeline's settings: one typed class, the guide's variable names, validated once per process.

Names are the guide's (``CLIP_INFERENCE_BACKEND``, ``RUNPOD_*``, ``EMBEDDING_HMAC_SECRET``, ...); new ones
follow the same style. Unset service settings mean "embedded": no ``DATABASE_URL`` starts an embedded
PostgreSQL, no ``SUPABASE_URL`` starts the embedded storage server, both under ``HEIMDEX_HOME``. A bad
value is a :class:`ConfigError` naming the variable, in one sentence. The model, weights, precision and
secret fields are shared with the worker (:class:`heimdex_clip_contract.settings.ClipSettings`).

A bad ``RUNPOD_*`` value must not stop what does not use RunPod (database reads, a sensor tick, the code
location loading): it is kept aside and raised by :meth:`Settings.require_runpod`, where a RunPod client
is made.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from heimdex_clip_contract.errors import ConfigError
from heimdex_clip_contract.schema import MAX_BATCH_ITEMS
from heimdex_clip_contract.settings import ClipSettings, CommaList, env_names, read

Backend = Literal["runpod", "local", "off"]
DEFAULT_RUNPOD_BASE_URL = "https://api.runpod.ai/v2"
DEFAULT_BACKFILL_CRON = "0 * * * *"
# Images per job: the worker takes up to 512 and a GPU needs hundreds to stay busy; on a CPU a forward
# pass of 32 already uses every core, and bigger ones only hold more memory.
DEFAULT_BATCH_SIZE = {"runpod": 256, "local": 32, "off": 32}
# Jobs in flight: the `clip_inference` pool's default limit (dagster.yaml); match RunPod max workers.
DEFAULT_MAX_IN_FLIGHT = 3
# How images go to the RunPod worker: batch jobs (ours), the guide's single-image jobs (a worker its users
# already run), or auto: batches, falling back to single images once if the worker does not speak them.
RequestMode = Literal["auto", "batch", "single"]
# Who owns what `add-video` and the inbox register when HEIMDEX_OWNER_ID is unset: a local user, which a
# fresh database's stand-in auth.users gets on first use (on Supabase, set a real user's id).
LOCAL_OWNER_ID = "00000000-0000-4000-8000-00000000000a"

# postgres:// or postgresql:// (a +driver suffix allowed), or libpq's key=value form ("host=... dbname=...").
_POSTGRES_URL = re.compile(r"postgres(ql)?(\+\w+)?://.*|(\s*\w+\s*=.*)", re.DOTALL)


def parse_user_id(raw: str, name: str) -> str:
    """A user id (``auth.users.id``) in canonical form; ``name`` is the variable or flag, for the message."""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a UUID; use a user id from auth.users") from None


@functools.cache
def model_dim(model_name: str) -> int:
    """The embedding width of an open_clip architecture, read from its config (no weights loaded).

    The bundled JSON is read directly: importing open_clip imports torch (~3 s), which every command
    would pay just to size the vector column.
    """
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    for folder in (spec and spec.submodule_search_locations) or ():
        config_file = Path(folder) / "model_configs" / f"{model_name}.json"
        if config_file.is_file():
            return int(json.loads(config_file.read_text())["embed_dim"])
    import open_clip  # names without a bundled file (e.g. hf-hub:...) need open_clip's own lookup

    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ConfigError(
            f"CLIP_MODEL_NAME={model_name!r} is not an open_clip model; "
            "try ViT-B-32 (see open_clip.list_models())"
        )
    return int(config["embed_dim"])


class Settings(ClipSettings):
    home: Path = Field(Path(".heimdex"), validation_alias="HEIMDEX_HOME")
    # Checked for its form only: the value may hold a password, so it is never echoed.
    database_url: str | None = Field(None, validation_alias="DATABASE_URL", repr=False)
    supabase_url: str | None = Field(None, validation_alias="SUPABASE_URL")
    supabase_key: str | None = Field(None, validation_alias="SUPABASE_SERVICE_ROLE_KEY", repr=False)
    bucket: str = Field("videos", validation_alias="SUPABASE_BUCKET")
    signed_url_expires_s: int = Field(300, ge=10, validation_alias="SIGNED_URL_EXPIRES_S")
    clip_backend: Backend = Field("local", validation_alias="CLIP_INFERENCE_BACKEND")
    clip_enabled: bool = Field(True, validation_alias="CLIP_ENABLED")
    # Unset: DEFAULT_BATCH_SIZE for the backend.
    clip_batch_size: int = Field(0, ge=1, validation_alias="CLIP_BATCH_SIZE", validate_default=False)
    runpod_max_in_flight: int = Field(DEFAULT_MAX_IN_FLIGHT, ge=1, validation_alias="RUNPOD_MAX_IN_FLIGHT")
    runpod_api_key: str | None = Field(None, validation_alias="RUNPOD_API_KEY", repr=False)
    runpod_endpoint_id: str | None = Field(None, validation_alias="RUNPOD_CLIP_ENDPOINT_ID")
    runpod_base_url: str = Field(DEFAULT_RUNPOD_BASE_URL, validation_alias="RUNPOD_ENDPOINT_BASE_URL")
    runpod_endpoint_url: str | None = Field(None, validation_alias="RUNPOD_CLIP_ENDPOINT_URL")
    runpod_timeout_s: float = Field(60.0, ge=1, allow_inf_nan=False, validation_alias="RUNPOD_TIMEOUT_S")
    runpod_max_retries: int = Field(3, ge=0, validation_alias="RUNPOD_MAX_RETRIES")
    runpod_request_mode: RequestMode = Field("auto", validation_alias="RUNPOD_REQUEST_MODE")
    inbox_dir: Path | None = Field(None, validation_alias="HEIMDEX_INBOX_DIR")
    inbox_settle_s: float = Field(10.0, ge=0, allow_inf_nan=False, validation_alias="HEIMDEX_INBOX_SETTLE_S")
    sensor_max_runs: int = Field(50, ge=1, validation_alias="HEIMDEX_SENSOR_MAX_RUNS")
    backfill_cron: str = Field(DEFAULT_BACKFILL_CRON, validation_alias="HEIMDEX_BACKFILL_CRON")
    partitions_per_run: int = Field(100, ge=1, validation_alias="HEIMDEX_PARTITIONS_PER_RUN")
    owner_id: str = Field(LOCAL_OWNER_ID, validation_alias="HEIMDEX_OWNER_ID")
    # The embedded storage server's upload cap; Supabase's default global limit is 50 MiB.
    storage_file_size_limit: int = Field(
        50 * 1024 * 1024, ge=1, validation_alias="HEIMDEX_STORAGE_FILE_SIZE_LIMIT"
    )
    # Its processes: one serves a laptop; a GPU host's worker downloads ~3,000 thumbnails/s from each.
    storage_workers: int = Field(1, ge=1, le=64, validation_alias="HEIMDEX_STORAGE_WORKERS")
    # `heimdex-clip serve`: bearer keys (comma-separated, for rotation) and Supabase users' tokens
    search_api_keys: CommaList = Field((), validation_alias="SEARCH_API_KEYS", repr=False)
    supabase_jwt_secret: str | None = Field(None, validation_alias="SUPABASE_JWT_SECRET", repr=False)
    search_cache_size: int = Field(1024, ge=0, validation_alias="SEARCH_CACHE_SIZE")
    search_video_url_expires_s: int = Field(3600, ge=10, validation_alias="SEARCH_VIDEO_URL_EXPIRES_S")
    max_image_size_bytes: int = Field(10 * 1024 * 1024, ge=1024, validation_alias="MAX_IMAGE_SIZE_BYTES")

    _runpod_error: ConfigError | None = PrivateAttr(None)

    @field_validator("clip_backend", "runpod_request_mode", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not _POSTGRES_URL.fullmatch(value):
            raise ValueError(
                "DATABASE_URL is not a Postgres connection URL; use "
                "postgresql://USER:PASSWORD@HOST:5432/DBNAME, or unset it for the embedded database"
            )
        return value

    @field_validator("owner_id")
    @classmethod
    def _user_id(cls, value: str) -> str:
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise ValueError("not a UUID; use a user id from auth.users") from None

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if self.supabase_url and not self.supabase_key:
            raise ValueError("SUPABASE_URL is set but SUPABASE_SERVICE_ROLE_KEY is not; set both")
        home = self.home.expanduser().resolve()
        # The guide: CLIP_ENABLED=false disables CLIP whatever the backend says.
        backend = self.clip_backend if self.clip_enabled else "off"
        batch = self.clip_batch_size or DEFAULT_BATCH_SIZE[backend]
        if backend == "runpod" and batch > MAX_BATCH_ITEMS:
            raise ValueError(
                f"CLIP_BATCH_SIZE={batch} is more than the worker takes in one job ({MAX_BATCH_ITEMS}); "
                f"use {DEFAULT_BATCH_SIZE['runpod']}"
            )
        derived = {
            "home": home,
            "inbox_dir": (self.inbox_dir or home / "inbox").expanduser().resolve(),
            "clip_backend": backend,
            "clip_batch_size": batch,
            "supabase_url": self.supabase_url.rstrip("/") if self.supabase_url else None,
            "runpod_base_url": self.runpod_base_url.rstrip("/"),
            "runpod_endpoint_url": (self.runpod_endpoint_url or "").rstrip("/") or None,
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, backend: str | None = None) -> Settings:
        """The settings of ``env`` (default: this process's environment), parsed once per distinct
        environment; ``backend`` overrides ``CLIP_INFERENCE_BACKEND`` (a CLI flag, a run's config) and
        goes through the same validation."""
        env = os.environ if env is None else env
        values = {name: env[name] for name in env_names(cls) if name in env}
        if backend:
            values["CLIP_INFERENCE_BACKEND"] = backend
        # The working directory is part of the key: a relative HEIMDEX_HOME resolves against it.
        return _parse(tuple(sorted(values.items())), os.getcwd())

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (a CLI flag, a run's config)."""
        copy = self.model_copy(update=changes)
        copy._runpod_error = self._runpod_error
        return copy

    @property
    def max_in_flight(self) -> int:
        """Jobs the engine keeps in flight: RunPod's workers, or two locally (one reading images while
        the other runs the model, which already uses every core)."""
        return self.runpod_max_in_flight if self.clip_backend == "runpod" else 2

    @property
    def clip_dim(self) -> int:
        return model_dim(self.clip_model_name)

    @property
    def embedded_db(self) -> bool:
        return self.database_url is None

    @property
    def embedded_storage(self) -> bool:
        return self.supabase_url is None

    @property
    def runpod_url(self) -> str:
        """Where jobs go: ``RUNPOD_CLIP_ENDPOINT_URL`` (e.g. a local ``--rp_serve_api`` worker, which
        serves ``/runsync`` with no ``/v2/{id}`` prefix) or ``RUNPOD_ENDPOINT_BASE_URL/{endpoint id}``."""
        return self.runpod_endpoint_url or f"{self.runpod_base_url}/{self.runpod_endpoint_id}"

    def require_runpod(self) -> None:
        """Raise the bad or missing RunPod setting, where a RunPod client is made."""
        if self._runpod_error is not None:
            raise self._runpod_error
        required = [("EMBEDDING_HMAC_SECRET", self.hmac_secret)]
        if not self.runpod_endpoint_url:  # RunPod's cloud: a local worker needs neither
            required += [
                ("RUNPOD_API_KEY", self.runpod_api_key),
                ("RUNPOD_CLIP_ENDPOINT_ID", self.runpod_endpoint_id),
            ]
        missing = [name for name, value in required if not value]
        if missing:
            raise ConfigError(
                f"CLIP_INFERENCE_BACKEND=runpod needs {', '.join(missing)}; set them, or use "
                "CLIP_INFERENCE_BACKEND=local"
            )


@functools.lru_cache(maxsize=32)
def _parse(items: tuple[tuple[str, str], ...], cwd: str) -> Settings:
    env = dict(items)
    try:
        return read(Settings, env)
    except ConfigError as exc:
        # Only RunPod's settings wrong: the rest still works; RunPod fails where it is used.
        runpod = {name for name in env if name.startswith("RUNPOD_")}
        if not runpod:
            raise
        try:
            settings = read(Settings, {k: v for k, v in env.items() if k not in runpod})
        except ConfigError:
            raise exc from None
        settings._runpod_error = exc
        return settings


def backfill_cron(env: Mapping[str, str] | None = None) -> str:
    """``HEIMDEX_BACKFILL_CRON`` alone: read when the code location loads, where no other setting (a bad
    ``RUNPOD_TIMEOUT_S``, say) may stop it."""
    env = os.environ if env is None else env
    return env.get("HEIMDEX_BACKFILL_CRON", "").strip() or DEFAULT_BACKFILL_CRON
