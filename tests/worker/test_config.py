"""WorkerConfig.from_env: defaults, the refusal to run unauthenticated, and errors naming the variable."""

from __future__ import annotations

import pytest

from runpod_worker.config import ConfigError, WorkerConfig


def test_defaults_match_the_seed() -> None:
    cfg = WorkerConfig.from_env({"EMBEDDING_HMAC_SECRET": " s \n"})
    assert cfg.hmac_secrets == ("s",)
    assert (cfg.clip_model_name, cfg.clip_pretrained, cfg.clip_model_version) == (
        "ViT-B-32",
        "openai",
        "openai-vit-b-32-v1",
    )
    assert (cfg.max_image_bytes, cfg.download_timeout_s, cfg.auth_window_s) == (10485760, 30.0, 120)
    assert cfg.host_allowlist == () and not cfg.allow_private_hosts and not cfg.allow_insecure_no_auth


def test_no_secret_refuses_to_start_unless_insecure_flag() -> None:
    with pytest.raises(ConfigError, match="EMBEDDING_HMAC_SECRET"):
        WorkerConfig.from_env({})
    assert WorkerConfig.from_env({"WORKER_ALLOW_INSECURE_NO_AUTH": "true"}).allow_insecure_no_auth
    # A secret always wins over the dev flag.
    both = WorkerConfig.from_env({"WORKER_ALLOW_INSECURE_NO_AUTH": "true", "EMBEDDING_HMAC_SECRET": "s"})
    assert not both.allow_insecure_no_auth


def test_rotation_and_allowlist() -> None:
    cfg = WorkerConfig.from_env(
        {
            "EMBEDDING_HMAC_SECRET": "new",
            "EMBEDDING_HMAC_SECRET_PREVIOUS": "old",
            "IMAGE_HOST_ALLOWLIST": "Abc.supabase.co, .example.com.",
            "CLIP_PRETRAINED": "/models/my-weights.safetensors",
            "CLIP_PRECISION": "bf16",
        }
    )
    assert cfg.hmac_secrets == ("new", "old")
    assert cfg.host_allowlist == ("abc.supabase.co", ".example.com")
    assert cfg.clip_model_version == "my-weights-vit-b-32-v1" and cfg.clip_precision == "bf16"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_IMAGE_SIZE_BYTES", "10MB"),
        ("MAX_IMAGE_SIZE_BYTES", "0"),
        ("IMAGE_DOWNLOAD_TIMEOUT", "soon"),
        ("AUTH_TIME_WINDOW_SECONDS", "-5"),
        ("CLIP_PRECISION", "int8"),
        ("CLIP_DEVICE", "tpu"),
        ("IMAGE_ALLOW_PRIVATE_HOSTS", "maybe"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        WorkerConfig.from_env({"EMBEDDING_HMAC_SECRET": "s", name: value})
