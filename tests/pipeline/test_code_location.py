"""The code location loads cleanly, and the project's dagster.yaml works on the embedded Postgres."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from dagster_postgres import PostgresRunStorage
from psycopg.conninfo import conninfo_to_dict

from heimdex_clip_assets.devservices.postgres import embedded_postgres

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def dagster_yaml_env(pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    info = conninfo_to_dict(pg_database)
    env = {
        "DAGSTER_HOME": str(ROOT),
        # dagster-postgres needs psycopg2 named explicitly (SQLAlchemy 2.1 defaults to psycopg 3)
        "DAGSTER_PG_URL": f"postgresql+psycopg2://postgres@/{info['dbname']}?host={info['host']}",
        "DAGSTER_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_instance_from_project_dagster_yaml(dagster_yaml_env: dict[str, str]) -> None:
    with dg.DagsterInstance.from_config(str(ROOT)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert instance.run_storage.postgres_url == dagster_yaml_env["DAGSTER_PG_URL"]
        instance.add_dynamic_partitions("videos", ["v1", "v2"])
        assert instance.get_dynamic_partitions("videos") == ["v1", "v2"]
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 3


def test_code_location_validates_without_warnings(dagster_yaml_env: dict[str, str], tmp_path: Path) -> None:
    env = {**os.environ, **dagster_yaml_env, "HEIMDEX_HOME": str(tmp_path / "home")}
    loaded = subprocess.run(
        [
            sys.executable,
            "-W",
            "always",
            "-c",
            "import heimdex_clip_assets.definitions as d; d.defs().get_repository_def()",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert "Warning" not in loaded.stderr, loaded.stderr


def _bare_env(home: Path) -> dict[str, str]:
    """What a Dagster user's shell has: no DAGSTER_* or project variables (a tmp HEIMDEX_HOME keeps the
    embedded services out of the repository)."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH", "HF_HUB_OFFLINE") if k in os.environ}
    return {**env, "HEIMDEX_HOME": str(home)}


@pytest.mark.parametrize(
    ("command", "passed"),
    [
        (["-m", "dagster", "definitions", "validate"], "All code locations passed validation"),
        (["dg", "check", "defs"], "All definitions loaded successfully"),
    ],
    ids=["dagster-definitions-validate", "dg-check-defs"],
)
def test_plain_dagster_commands_work_in_the_repo_root_with_no_variables(
    embedded_home: Path, command: list[str], passed: str
) -> None:
    argv = (
        [sys.executable, *command]
        if command[0] == "-m"
        else [str(Path(sys.executable).parent / "dg"), *command[1:]]
    )
    try:
        result = subprocess.run(
            argv, env=_bare_env(embedded_home), cwd=ROOT, capture_output=True, text=True, timeout=180
        )
        assert passed in result.stdout + result.stderr, result.stdout + result.stderr
        assert "DAGSTER_PG_URL" not in result.stdout + result.stderr
    finally:
        embedded_postgres(embedded_home).stop()  # the instance started it there


def test_resources_show_where_a_set_variable_comes_from(monkeypatch: pytest.MonkeyPatch) -> None:
    from heimdex_clip_assets.defs.resources import resources

    monkeypatch.setenv("DATABASE_URL", "postgresql://user:secret@db.example/x")
    monkeypatch.delenv("SUPABASE_BUCKET", raising=False)
    db, storage = (resources().resources[name] for name in ("db", "storage"))
    assert db.database_url == dg.EnvVar("DATABASE_URL")  # the UI shows the name, never the password
    assert storage.bucket is None  # unset: the typed settings' default
