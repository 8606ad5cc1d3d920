"""The code location loads cleanly, and the project's dagster.yaml works on the embedded Postgres."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from psycopg.conninfo import conninfo_to_dict

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
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
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
    validated = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "All code locations passed validation" in validated.stdout + validated.stderr
