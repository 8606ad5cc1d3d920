"""Dagster's instance storage on the project's defaults, so ``dagster.yaml`` needs no variables.

``dagster dev``, ``dg dev`` and ``dagster definitions validate`` run in the repository root with nothing
set, exactly as ``heimdex-clip dev`` does: runs, events and schedules go to ``DAGSTER_PG_URL`` when it
is set, else to the same Postgres the pipeline uses (``DATABASE_URL``, or the embedded server under
``HEIMDEX_HOME``, started if needed); artifacts and compute logs to ``DAGSTER_ARTIFACTS_DIR``, else
``HEIMDEX_HOME/dagster``. Each class is dagster-postgres' own (or Dagster's local one) with the URL or
folder resolved here instead of read from required config.
"""

from __future__ import annotations

import os
from typing import Any

from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager
from dagster._core.storage.root import LocalArtifactStorage
from dagster._serdes import ConfigurableClassData
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from heimdex_clip_assets import services
from heimdex_clip_assets.config import Settings


def instance_postgres_url() -> str:
    # psycopg2 named explicitly: with SQLAlchemy 2.1 a bare postgresql:// resolves to psycopg 3, with
    # which dagster's run-event NOTIFY fails.
    return os.environ.get("DAGSTER_PG_URL") or services.dagster_storage_url(Settings.from_env())


def artifacts_dir() -> str:
    return os.environ.get("DAGSTER_ARTIFACTS_DIR") or str(Settings.from_env().home / "dagster")


class _ResolvedHere:
    """A Dagster instance class whose one setting (a URL or a folder) is resolved here, not configured:
    ``dagster.yaml`` names the class with no config."""

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {}

    @classmethod
    def resolved(cls) -> dict[str, str]:
        raise NotImplementedError

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> Any:
        return cls(inst_data=inst_data, **cls.resolved())  # type: ignore[call-arg]


class _InPostgres(_ResolvedHere):
    @classmethod
    def resolved(cls) -> dict[str, str]:
        return {"postgres_url": instance_postgres_url()}


class _InArtifactsDir(_ResolvedHere):
    @classmethod
    def resolved(cls) -> dict[str, str]:
        return {"base_dir": artifacts_dir()}


# The mixin comes first so its config_type/from_config_value win over the Dagster class's.
class HeimdexRunStorage(_InPostgres, PostgresRunStorage):
    pass


class HeimdexEventLogStorage(_InPostgres, PostgresEventLogStorage):
    pass


class HeimdexScheduleStorage(_InPostgres, PostgresScheduleStorage):
    pass


class HeimdexArtifactStorage(_InArtifactsDir, LocalArtifactStorage):
    pass


class HeimdexComputeLogManager(_InArtifactsDir, LocalComputeLogManager):
    pass
