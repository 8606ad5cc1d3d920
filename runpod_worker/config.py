"""Worker settings, read once from the environment and validated at start.

Names follow the guide's Configuration Reference; the additions (secret rotation, host allowlist, the
explicit escape hatches) use the same style. The model, weights, precision and secret variables are the
pipeline's too (:class:`heimdex_clip_contract.settings.ClipSettings`). A bad value stops the worker at
start with a sentence naming the variable, rather than failing every job later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from heimdex_clip_contract.errors import ConfigError
from heimdex_clip_contract.settings import ClipSettings, comma_list, read
from heimdex_clip_contract.signing import DEFAULT_AUTH_WINDOW_S, SIGNATURE_VERSIONS


def _hosts(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(h.lower().rstrip(".") for h in comma_list(value))
    return value


def _device(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip().lower()
        return None if value in ("", "auto") else value
    return value


class WorkerConfig(ClipSettings):
    hmac_secret_previous: str | None = Field(
        None, validation_alias="EMBEDDING_HMAC_SECRET_PREVIOUS", repr=False
    )
    allow_insecure_no_auth: bool = Field(False, validation_alias="WORKER_ALLOW_INSECURE_NO_AUTH")
    device: Annotated[Literal["cpu", "cuda"] | None, BeforeValidator(_device)] = Field(
        None, validation_alias="CLIP_DEVICE"
    )
    max_image_bytes: int = Field(10 * 1024 * 1024, gt=0, le=2**30, validation_alias="MAX_IMAGE_SIZE_BYTES")
    download_timeout_s: float = Field(
        30.0, gt=0, le=3600, allow_inf_nan=False, validation_alias="IMAGE_DOWNLOAD_TIMEOUT"
    )
    auth_window_s: int = Field(
        DEFAULT_AUTH_WINDOW_S, gt=0, le=3600, validation_alias="AUTH_TIME_WINDOW_SECONDS"
    )
    host_allowlist: Annotated[tuple[str, ...], BeforeValidator(_hosts)] = Field(
        (), validation_alias="IMAGE_HOST_ALLOWLIST"
    )
    allow_private_hosts: bool = Field(False, validation_alias="IMAGE_ALLOW_PRIVATE_HOSTS")
    download_concurrency: int = Field(16, gt=0, le=1024, validation_alias="IMAGE_DOWNLOAD_CONCURRENCY")
    job_concurrency: int = Field(4, gt=0, le=256, validation_alias="WORKER_CONCURRENCY")
    # 2 refuses the guide's unsigned-fields forms (image_url|ts and the old batch message).
    auth_min_version: int = Field(
        1,
        ge=min(SIGNATURE_VERSIONS),
        le=max(SIGNATURE_VERSIONS),
        validation_alias="AUTH_MIN_SIGNATURE_VERSION",
    )

    @model_validator(mode="after")
    def _check_auth(self) -> WorkerConfig:
        if self.hmac_secret_previous and not self.hmac_secret:
            raise ValueError("EMBEDDING_HMAC_SECRET_PREVIOUS is set but EMBEDDING_HMAC_SECRET is empty")
        if not self.hmac_secrets and not self.allow_insecure_no_auth:
            raise ValueError(
                "EMBEDDING_HMAC_SECRET is not set: the worker refuses unauthenticated jobs. Set it to the "
                "caller's secret (python3 -c 'import secrets; print(secrets.token_hex(32))'), or for local "
                "development only set WORKER_ALLOW_INSECURE_NO_AUTH=true"
            )
        # Insecure mode only where there is no secret: a configured secret is always enforced.
        object.__setattr__(
            self, "allow_insecure_no_auth", self.allow_insecure_no_auth and not self.hmac_secrets
        )
        return self

    @property
    def hmac_secrets(self) -> tuple[str, ...]:
        """The secrets a signature may match: the current one and, during a rotation, the previous."""
        return tuple(s for s in (self.hmac_secret, self.hmac_secret_previous) if s)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerConfig:
        """Build and validate; raises :class:`ConfigError` naming the first bad variable."""
        return read(cls, env)


__all__ = ["ConfigError", "WorkerConfig"]
