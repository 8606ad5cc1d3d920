"""Fault-suite fixtures: the CLI on embedded defaults, and an endpoint that stalls until released."""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from heimdex_clip_assets import services
from heimdex_clip_assets.config import Settings
from tests.fixtures.cli import ROOT, run_cli
from tests.fixtures.fake_servers import TcpServer
from tests.fixtures.services import reachable_dir

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
POOL = "clip_inference"


class StallingEndpoint(TcpServer):
    """Accepts connections and reads the request, then answers nothing until :meth:`release`.

    Stands in for a RunPod endpoint whose job never finishes: the run sits inside the embedding step,
    holding its ``clip_inference`` slot, where a fault (a signal, a stopped database) can be injected.
    """

    def __init__(self) -> None:
        self.hit = threading.Event()
        self._release = threading.Event()
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            self.hit.set()
            self._release.wait()
            body = b'{"error": "stalled endpoint released"}'
            conn.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self.release()
        super().close()


@pytest.fixture
def stalling_endpoint() -> Iterator[StallingEndpoint]:
    endpoint = StallingEndpoint()
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with reachable_dir("heimdex-faults-") as path:
        yield path
        services.stop_embedded(Settings.from_env({"HEIMDEX_HOME": str(path)}))


@pytest.fixture(scope="module")
def env(home: Path, clip_checkpoint: Path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "DAGSTER_", "SUPABASE_"))}
    keep.pop("DATABASE_URL", None)
    return keep | {
        "HEIMDEX_HOME": str(home),
        "CLIP_PRETRAINED": str(clip_checkpoint),
        "HF_HUB_OFFLINE": "1",
        "EMBEDDING_HMAC_SECRET": "faults-secret",
        "RUNPOD_TIMEOUT_S": "600",
        "RUNPOD_MAX_RETRIES": "0",
        "COLUMNS": "200",
    }


@pytest.fixture(scope="module")
def instance(env: dict[str, str]) -> Iterator[dg.DagsterInstance]:
    """The CLI's Dagster instance (the project's dagster.yaml on the embedded Postgres), seen from here."""
    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in ("HEIMDEX_HOME",)}, DAGSTER_HOME=str(ROOT))
    for name in ("DATABASE_URL", "DAGSTER_PG_URL", "DAGSTER_ARTIFACTS_DIR"):
        os.environ.pop(name, None)
    try:
        # Started here, the embedded services outlive each command (a command stops only what it started).
        services.storage(Settings.from_env())
        with dg.DagsterInstance.from_config(str(ROOT)) as inst:
            inst.event_log_storage.set_concurrency_slots(POOL, 1)
            yield inst
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def video_id(env: dict[str, str], sample_video: Path, instance: dg.DagsterInstance) -> str:
    added = run_cli(env, "add-video", str(sample_video))
    assert added.returncode == 0, added.stderr
    return UUID.findall(added.stdout)[0]
