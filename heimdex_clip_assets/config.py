"""Pipeline settings, read from the environment once and validated.

Names are the seed's (``CLIP_INFERENCE_BACKEND``, ``RUNPOD_*``, ``EMBEDDING_HMAC_SECRET``, ...); new ones
follow the same style. Unset service settings mean "embedded": no ``DATABASE_URL`` starts an embedded
PostgreSQL, no ``SUPABASE_URL`` starts the embedded storage server, both under ``HEIMDEX_HOME``.
A bad value is a :class:`ConfigError` naming the variable and what it accepts.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from heimdex_clip_contract.errors import ConfigError
from heimdex_clip_contract.schema import MAX_BATCH_ITEMS, derive_model_version

Backend = Literal["runpod", "local", "off"]
BACKENDS: tuple[str, ...] = ("runpod", "local", "off")
DEFAULT_RUNPOD_BASE_URL = "https://api.runpod.ai/v2"
# Images per job: the worker takes up to 512 and a GPU needs hundreds to stay busy; on a CPU a forward
# pass of 32 already uses every core, and bigger ones only hold more memory.
DEFAULT_BATCH_SIZE = {"runpod": 256, "local": 32, "off": 32}
# Jobs in flight: the `clip_inference` pool's default limit (dagster.yaml); match RunPod max workers.
DEFAULT_MAX_IN_FLIGHT = 3
# How images go to the RunPod worker: batch jobs (ours), the guide's single-image jobs (a worker its users
# already run), or auto: batches, falling back to single images once if the worker does not speak them.
RequestMode = Literal["auto", "batch", "single"]
REQUEST_MODES: tuple[str, ...] = ("auto", "batch", "single")
# Who owns what `add-video` and the inbox register when HEIMDEX_OWNER_ID is unset: a local user, which a
# fresh database's stand-in auth.users gets on first use (on Supabase, set a real user's id).
LOCAL_OWNER_ID = "00000000-0000-4000-8000-00000000000a"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()  # the seed's troubleshooting: stray whitespace/newlines in pasted secrets
    return value or None


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use true or false")


def env_number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value):  # nan passes every comparison, inf makes timeouts endless
        raise ConfigError(f"{name}={raw!r} must be a finite number")
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    value = env_number(env, name, default, minimum=minimum)
    if value != int(value):
        raise ConfigError(f"{name}={value!r} must be a whole number")
    return int(value)


# postgres:// or postgresql:// (a +driver suffix allowed), or libpq's key=value form ("host=... dbname=...").
_POSTGRES_URL = re.compile(r"postgres(ql)?(\+\w+)?://.*|(\s*\w+\s*=.*)", re.DOTALL)


def _postgres_url(env: Mapping[str, str], name: str) -> str | None:
    """A connection string, checked for its form only (the value may hold a password: never echoed)."""
    value = _get(env, name)
    if value is not None and not _POSTGRES_URL.fullmatch(value):
        raise ConfigError(
            f"{name} is not a Postgres connection URL; use postgresql://USER:PASSWORD@HOST:5432/DBNAME, "
            "or unset it for the embedded database"
        )
    return value


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


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str | None
    supabase_url: str | None
    supabase_key: str | None
    bucket: str
    signed_url_expires_s: int
    clip_backend: Backend
    clip_model_name: str
    clip_pretrained: str
    clip_model_version: str
    clip_precision: str | None
    clip_batch_size: int
    runpod_max_in_flight: int
    runpod_api_key: str | None
    runpod_endpoint_id: str | None
    runpod_base_url: str
    runpod_endpoint_url: str | None
    runpod_timeout_s: float
    runpod_max_retries: int
    hmac_secret: str | None
    inbox_dir: Path
    inbox_settle_s: float
    sensor_max_runs: int
    backfill_cron: str
    storage_file_size_limit: int
    search_api_keys: tuple[str, ...]
    supabase_jwt_secret: str | None
    search_cache_size: int
    search_video_url_expires_s: int
    max_image_size_bytes: int
    partitions_per_run: int
    owner_id: str
    runpod_request_mode: RequestMode

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (a CLI flag, a run's config)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, backend: str | None = None) -> Settings:
        """Read and validate the settings; ``backend`` overrides ``CLIP_INFERENCE_BACKEND`` (a CLI flag,
        a run's config) and goes through the same validation."""
        env = os.environ if env is None else env
        if backend:
            env = {**env, "CLIP_INFERENCE_BACKEND": backend}
        home = Path(_get(env, "HEIMDEX_HOME") or ".heimdex").expanduser().resolve()

        backend = (_get(env, "CLIP_INFERENCE_BACKEND") or "local").lower()
        if backend not in BACKENDS:
            raise ConfigError(f"CLIP_INFERENCE_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}")
        if not env_bool(env, "CLIP_ENABLED", True):
            backend = "off"  # the seed: CLIP_ENABLED=false disables CLIP whatever the backend says

        supabase_url = _get(env, "SUPABASE_URL")
        supabase_key = _get(env, "SUPABASE_SERVICE_ROLE_KEY")
        if supabase_url and not supabase_key:
            raise ConfigError("SUPABASE_URL is set but SUPABASE_SERVICE_ROLE_KEY is not; set both")

        precision = (_get(env, "CLIP_PRECISION") or "").lower() or None
        if precision not in (None, "fp32", "bf16", "fp16"):
            raise ConfigError(f"CLIP_PRECISION={precision!r} is not one of fp32, bf16, fp16")

        request_mode = (_get(env, "RUNPOD_REQUEST_MODE") or "auto").lower()
        if request_mode not in REQUEST_MODES:
            raise ConfigError(
                f"RUNPOD_REQUEST_MODE={request_mode!r} is not one of {', '.join(REQUEST_MODES)}"
            )

        owner = _get(env, "HEIMDEX_OWNER_ID")
        model_name = _get(env, "CLIP_MODEL_NAME") or "ViT-B-32"
        pretrained = _get(env, "CLIP_PRETRAINED") or "openai"
        settings = cls(
            home=home,
            database_url=_postgres_url(env, "DATABASE_URL"),
            supabase_url=supabase_url.rstrip("/") if supabase_url else None,
            supabase_key=supabase_key,
            bucket=_get(env, "SUPABASE_BUCKET") or "videos",
            signed_url_expires_s=env_int(env, "SIGNED_URL_EXPIRES_S", 300, minimum=10),
            clip_backend=backend,  # type: ignore[arg-type]
            clip_model_name=model_name,
            clip_pretrained=pretrained,
            clip_model_version=_get(env, "CLIP_MODEL_VERSION")
            or derive_model_version(model_name, pretrained),
            clip_precision=precision,
            clip_batch_size=env_int(env, "CLIP_BATCH_SIZE", DEFAULT_BATCH_SIZE[backend], minimum=1),
            runpod_max_in_flight=env_int(env, "RUNPOD_MAX_IN_FLIGHT", DEFAULT_MAX_IN_FLIGHT, minimum=1),
            runpod_api_key=_get(env, "RUNPOD_API_KEY"),
            runpod_endpoint_id=_get(env, "RUNPOD_CLIP_ENDPOINT_ID"),
            runpod_base_url=(_get(env, "RUNPOD_ENDPOINT_BASE_URL") or DEFAULT_RUNPOD_BASE_URL).rstrip("/"),
            runpod_endpoint_url=(_get(env, "RUNPOD_CLIP_ENDPOINT_URL") or "").rstrip("/") or None,
            runpod_timeout_s=env_number(env, "RUNPOD_TIMEOUT_S", 60.0, minimum=1),
            runpod_max_retries=env_int(env, "RUNPOD_MAX_RETRIES", 3),
            hmac_secret=_get(env, "EMBEDDING_HMAC_SECRET"),
            inbox_dir=Path(_get(env, "HEIMDEX_INBOX_DIR") or home / "inbox").expanduser().resolve(),
            inbox_settle_s=env_number(env, "HEIMDEX_INBOX_SETTLE_S", 10.0),
            sensor_max_runs=env_int(env, "HEIMDEX_SENSOR_MAX_RUNS", 50, minimum=1),
            backfill_cron=_get(env, "HEIMDEX_BACKFILL_CRON") or "0 * * * *",
            # The embedded storage server's upload cap; Supabase's default global limit is 50 MiB.
            storage_file_size_limit=env_int(
                env, "HEIMDEX_STORAGE_FILE_SIZE_LIMIT", 50 * 1024 * 1024, minimum=1
            ),
            # `heimdex-clip serve`: bearer keys (comma-separated, for rotation) and Supabase users' tokens
            search_api_keys=tuple(
                k.strip() for k in (_get(env, "SEARCH_API_KEYS") or "").split(",") if k.strip()
            ),
            supabase_jwt_secret=_get(env, "SUPABASE_JWT_SECRET"),
            search_cache_size=env_int(env, "SEARCH_CACHE_SIZE", 1024),
            search_video_url_expires_s=env_int(env, "SEARCH_VIDEO_URL_EXPIRES_S", 3600, minimum=10),
            max_image_size_bytes=env_int(env, "MAX_IMAGE_SIZE_BYTES", 10 * 1024 * 1024, minimum=1024),
            partitions_per_run=env_int(env, "HEIMDEX_PARTITIONS_PER_RUN", 100, minimum=1),
            owner_id=parse_user_id(owner, "HEIMDEX_OWNER_ID") if owner else LOCAL_OWNER_ID,
            runpod_request_mode=request_mode,  # type: ignore[arg-type]
        )
        if settings.clip_backend == "runpod" and settings.clip_batch_size > MAX_BATCH_ITEMS:
            raise ConfigError(
                f"CLIP_BATCH_SIZE={settings.clip_batch_size} is more than the worker takes in one job "
                f"({MAX_BATCH_ITEMS}); use {DEFAULT_BATCH_SIZE['runpod']}"
            )
        # RunPod's credentials are checked where a RunPod client is made, not here: reading the database
        # or storage (a sensor tick, `search`) must not fail on settings it does not use.
        return settings

    @property
    def runpod_url(self) -> str:
        """Where jobs go: ``RUNPOD_CLIP_ENDPOINT_URL`` (e.g. a local ``--rp_serve_api`` worker, which
        serves ``/runsync`` with no ``/v2/{id}`` prefix) or ``RUNPOD_ENDPOINT_BASE_URL/{endpoint id}``."""
        return self.runpod_endpoint_url or f"{self.runpod_base_url}/{self.runpod_endpoint_id}"

    def require_runpod(self) -> None:
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
