"""One typed config: the guide's names, one sentence per bad value, parsed once, RunPod kept aside."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from heimdex_clip_assets.config import Settings
from heimdex_clip_contract.errors import ConfigError
from heimdex_clip_contract.settings import ClipSettings, env_names
from runpod_worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_the_guides_names(tmp_path: Path) -> None:
    settings = Settings.from_env({"HEIMDEX_HOME": str(tmp_path), "CLIP_INFERENCE_BACKEND": " RunPod\n"})
    assert settings.clip_backend == "runpod" and settings.home == tmp_path
    assert settings.inbox_dir == tmp_path / "inbox"
    assert (settings.clip_model_name, settings.clip_model_version, settings.clip_dim) == (
        "ViT-B-32",
        "openai-vit-b-32-v1",
        512,
    )
    assert Settings.from_env({"CLIP_ENABLED": "false"}).clip_backend == "off"
    assert Settings.from_env({"CLIP_PRECISION": "", "DATABASE_URL": "  "}).clip_precision is None
    assert Settings.from_env({"DATABASE_URL": "  "}).embedded_db


def test_the_worker_and_the_pipeline_share_the_clip_fields() -> None:
    env = {"EMBEDDING_HMAC_SECRET": " s\n", "CLIP_PRECISION": "BF16", "CLIP_PRETRAINED": "/w/my.safetensors"}
    pipeline, worker = Settings.from_env(env), WorkerConfig.from_env(env)
    assert isinstance(pipeline, ClipSettings) and isinstance(worker, ClipSettings)
    for name in ClipSettings.model_fields:
        assert getattr(pipeline, name) == getattr(worker, name), name
    assert worker.clip_model_version == "my-vit-b-32-v1" and worker.hmac_secrets == ("s",)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CLIP_INFERENCE_BACKEND", "gpu"),
        ("CLIP_ENABLED", "maybe"),
        ("CLIP_BATCH_SIZE", "0"),
        ("CLIP_PRECISION", "int8"),
        ("SIGNED_URL_EXPIRES_S", "soon"),
        ("HEIMDEX_INBOX_SETTLE_S", "nan"),
        ("HEIMDEX_SENSOR_MAX_RUNS", "-1"),
    ],
)
def test_a_bad_value_is_one_sentence_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    message = info.value.message
    assert message.startswith(f"{name}={value!r} is invalid: ") and message.endswith("; fix or unset it")
    assert "\n" not in message and not info.value.retryable


def test_a_bad_runpod_setting_fails_only_where_runpod_is_used() -> None:
    settings = Settings.from_env({"RUNPOD_TIMEOUT_S": "inf", "DATABASE_URL": "postgresql://db/x"})
    assert settings.database_url == "postgresql://db/x"  # everything else is read as usual
    with pytest.raises(ConfigError, match=r"^RUNPOD_TIMEOUT_S='inf' is invalid"):
        settings.require_runpod()
    with pytest.raises(ConfigError, match="RUNPOD_TIMEOUT_S"):
        settings.replace(bucket="other").require_runpod()


def test_the_code_location_loads_with_a_bad_runpod_setting(tmp_path: Path) -> None:
    env = {**os.environ, "RUNPOD_TIMEOUT_S": "abc", "HEIMDEX_BACKFILL_CRON": "*/5 * * * *"}
    env["HEIMDEX_HOME"] = str(tmp_path)
    code = (
        "import heimdex_clip_assets.definitions as d; r = d.defs().get_repository_def(); "
        "print(r.get_schedule_def('embedding_backfill_schedule').cron_schedule)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "*/5 * * * *"


def test_parsed_once_per_process_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIP_BATCH_SIZE", "7")
    first = Settings.from_env()
    assert Settings.from_env() is first and first.clip_batch_size == 7
    monkeypatch.setenv("CLIP_BATCH_SIZE", "8")
    assert Settings.from_env().clip_batch_size == 8


def test_secrets_and_urls_with_passwords_are_never_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"DATABASE_URL": "mysql://root:hunter2@db/x"})
    assert info.value.message.startswith("DATABASE_URL is not a Postgres connection URL; use postgresql://")
    assert "hunter2" not in info.value.message
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"SEARCH_API_KEYS": "k", "HEIMDEX_OWNER_ID": "alice"})
    assert info.value.message == (
        "HEIMDEX_OWNER_ID='alice' is invalid: not a UUID; use a user id from auth.users"
    )


def test_batch_size_follows_the_backend_unless_set() -> None:
    assert Settings.from_env({"CLIP_INFERENCE_BACKEND": "runpod"}).clip_batch_size == 256
    assert Settings.from_env({}).clip_batch_size == 32
    with pytest.raises(ConfigError, match=r"^CLIP_BATCH_SIZE=600 is more than the worker takes"):
        Settings.from_env({"CLIP_INFERENCE_BACKEND": "runpod", "CLIP_BATCH_SIZE": "600"})
    assert Settings.from_env({"RUNPOD_REQUEST_MODE": "Single"}).runpod_request_mode == "single"


def test_every_pipeline_variable_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in env_names(Settings) if f"`{name}`" not in readme]
    assert not missing, f"README's Configuration table lacks {missing}"
