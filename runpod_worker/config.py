"""Worker settings, read once from the environment and validated at start.

Names follow the seed's Configuration Reference; the additions (secret rotation, host allowlist, the
explicit escape hatches) use the same style. A bad value stops the worker at start with a message
naming the variable, rather than failing every job later.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from heimdex_clip_contract.errors import ConfigError
from heimdex_clip_contract.schema import derive_model_version
from heimdex_clip_contract.signing import DEFAULT_AUTH_WINDOW_S, SIGNATURE_VERSIONS

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("cpu", "cuda")


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    return (env.get(name) or default).strip()


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _number(env: Mapping[str, str], name: str, default: float, *, integer: bool, maximum: float) -> float:
    """A finite number in (0, maximum]: nan, inf and absurd values stop the worker at start."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a {'whole ' if integer else ''}number, got {raw!r}") from None
    if not math.isfinite(value) or not 0 < value <= maximum:
        raise ConfigError(f"{name} must be a number greater than 0 and at most {maximum:g}, got {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    raw = env.get(name, "").strip().lower()
    if not raw or raw == "auto":
        return None
    if raw not in choices:
        raise ConfigError(f"{name} must be one of auto, {', '.join(choices)}; got {raw!r}")
    return raw


@dataclass(frozen=True)
class WorkerConfig:
    hmac_secrets: tuple[str, ...]
    allow_insecure_no_auth: bool = False
    model_name: str = "ViT-B-32"
    pretrained: str = "openai"
    model_version: str = ""
    precision: str | None = None
    device: str | None = None
    max_image_bytes: int = 10 * 1024 * 1024
    download_timeout_s: float = 30.0
    auth_window_s: int = DEFAULT_AUTH_WINDOW_S
    host_allowlist: tuple[str, ...] = ()
    allow_private_hosts: bool = False
    download_concurrency: int = 16
    job_concurrency: int = 4
    auth_min_version: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerConfig:
        """Build and validate; raises :class:`ConfigError` naming the first bad variable."""
        # Secrets are used exactly as given apart from surrounding whitespace: the seed's
        # troubleshooting lists a stray newline in the secret as a classic cause of auth failures.
        secrets = tuple(
            s
            for s in (
                env.get("EMBEDDING_HMAC_SECRET", "").strip(),
                env.get("EMBEDDING_HMAC_SECRET_PREVIOUS", "").strip(),
            )
            if s
        )
        insecure = _bool(env, "WORKER_ALLOW_INSECURE_NO_AUTH")
        if "EMBEDDING_HMAC_SECRET_PREVIOUS" in env and not env.get("EMBEDDING_HMAC_SECRET", "").strip():
            raise ConfigError("EMBEDDING_HMAC_SECRET_PREVIOUS is set but EMBEDDING_HMAC_SECRET is empty")
        if not secrets and not insecure:
            raise ConfigError(
                "EMBEDDING_HMAC_SECRET is not set: the worker refuses unauthenticated jobs. Set it to the "
                "caller's secret (python3 -c 'import secrets; print(secrets.token_hex(32))'), or for local "
                "development only set WORKER_ALLOW_INSECURE_NO_AUTH=true"
            )
        model_name = _str(env, "CLIP_MODEL_NAME", "ViT-B-32")
        pretrained = _str(env, "CLIP_PRETRAINED", "openai")
        allowlist = tuple(
            h.strip().lower().rstrip(".") for h in env.get("IMAGE_HOST_ALLOWLIST", "").split(",") if h.strip()
        )
        return cls(
            hmac_secrets=secrets,
            allow_insecure_no_auth=insecure and not secrets,
            model_name=model_name,
            pretrained=pretrained,
            model_version=_str(env, "CLIP_MODEL_VERSION", "") or derive_model_version(model_name, pretrained),
            precision=_choice(env, "CLIP_PRECISION", PRECISIONS),
            device=_choice(env, "CLIP_DEVICE", DEVICES),
            max_image_bytes=int(
                _number(env, "MAX_IMAGE_SIZE_BYTES", cls.max_image_bytes, integer=True, maximum=2**30)
            ),
            download_timeout_s=_number(
                env, "IMAGE_DOWNLOAD_TIMEOUT", cls.download_timeout_s, integer=False, maximum=3600
            ),
            auth_window_s=int(
                _number(env, "AUTH_TIME_WINDOW_SECONDS", cls.auth_window_s, integer=True, maximum=3600)
            ),
            auth_min_version=int(
                _number(env, "AUTH_MIN_SIGNATURE_VERSION", 1, integer=True, maximum=max(SIGNATURE_VERSIONS))
            ),
            host_allowlist=allowlist,
            allow_private_hosts=_bool(env, "IMAGE_ALLOW_PRIVATE_HOSTS"),
            download_concurrency=int(
                _number(
                    env, "IMAGE_DOWNLOAD_CONCURRENCY", cls.download_concurrency, integer=True, maximum=1024
                )
            ),
            job_concurrency=int(
                _number(env, "WORKER_CONCURRENCY", cls.job_concurrency, integer=True, maximum=256)
            ),
        )
