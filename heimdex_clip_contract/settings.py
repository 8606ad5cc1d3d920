"""Settings shared by the worker and the pipeline, read with pydantic-settings under the guide's names.

The one module of the contract that is not standard library: both sides install pydantic-settings. Each
side's settings class derives from :class:`ClipSettings`, so the model, weights, precision and secret
variables are declared and validated once. :func:`read` validates a mapping of environment variables
and turns the first failure into a :class:`ConfigError` that names the variable, in one sentence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AliasChoices, BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError
from .schema import derive_model_version

S = TypeVar("S", bound="ClipSettings")


def _auto_is_none(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip().lower()
        return None if value in ("", "auto") else value
    return value


def comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


# "a, b,,c" -> ("a", "b", "c"): lists in one variable, as the guide's IMAGE_HOST_ALLOWLIST.
CommaList = Annotated[tuple[str, ...], BeforeValidator(comma_list)]
Precision = Annotated[Literal["fp32", "bf16", "fp16"] | None, BeforeValidator(_auto_is_none)]


def env_names(cls: type[BaseSettings]) -> list[str]:
    """Every variable name a settings class reads (its fields' validation aliases)."""
    names = []
    for field in cls.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, str):
            names.append(alias)
        elif isinstance(alias, AliasChoices):
            names += [c for c in alias.choices if isinstance(c, str)]
    return names


def read(cls: type[S], env: Mapping[str, str]) -> S:
    """Validate ``cls`` from ``env`` alone (never the process environment behind its back).

    Surrounding whitespace is dropped (a stray newline in a pasted secret is the guide's classic
    auth failure) and an empty variable counts as unset.
    """
    data = {name: env[name].strip() for name in env_names(cls) if name in env and env[name].strip()}
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise config_error(cls, exc, data) from None


def config_error(cls: type[BaseSettings], exc: ValidationError, data: Mapping[str, str]) -> ConfigError:
    """The first failure as one sentence: the variable, its value unless secret, and what to do."""
    first = exc.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else ""
    message = str(first["msg"]).removeprefix("Value error, ")
    if not name or message.startswith(name):  # a validator's own sentence already names it
        return ConfigError(message)
    message = message[0].lower() + message[1:]
    if "; " not in message:  # pydantic's own words say what is wrong, not what to do
        message += "; fix or unset it"
    secret = {
        field.validation_alias for field in cls.model_fields.values() if not field.repr
    }  # never echo a secret (or a URL holding a password)
    shown = name if name in secret or name not in data else f"{name}={data[name]!r}"
    return ConfigError(f"{shown} is invalid: {message}")


class ClipSettings(BaseSettings):
    """The CLIP model and the shared secret, as both the worker and the pipeline read them."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", validate_default=True)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: Any, *sources: Any, **more: Any
    ) -> tuple[Any, ...]:
        # Only what read() passes in: the variables are gathered (stripped, empties dropped) there, once.
        return (init_settings,)

    clip_model_name: str = Field("ViT-B-32", validation_alias="CLIP_MODEL_NAME")
    clip_pretrained: str = Field("openai", validation_alias="CLIP_PRETRAINED")
    # Stored with every vector; derived from the two above when unset (openai-vit-b-32-v1).
    clip_model_version: str = Field("", validation_alias="CLIP_MODEL_VERSION")
    # fp32 on CPU, fp16 on CUDA when unset ("auto").
    clip_precision: Precision = Field(None, validation_alias="CLIP_PRECISION")
    hmac_secret: str | None = Field(None, validation_alias="EMBEDDING_HMAC_SECRET", repr=False)

    @model_validator(mode="after")
    def _derive_model_version(self) -> ClipSettings:
        if not self.clip_model_version:
            object.__setattr__(
                self, "clip_model_version", derive_model_version(self.clip_model_name, self.clip_pretrained)
            )
        return self
