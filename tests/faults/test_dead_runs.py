"""Issue 9, items 1 and 7: runs killed, interrupted, or cut off from Postgres, through the real CLI.

``heimdex-clip process-video`` runs as a subprocess on embedded defaults (embedded Postgres and storage
under its own HEIMDEX_HOME) with the RunPod backend pointed at an endpoint that never answers, so the run
sits in ``scene_clip_embeddings`` holding its ``clip_inference`` slot. Then the fault: SIGKILL, SIGINT,
SIGTERM, or Postgres stopped. The pool is set to one slot, so a leaked slot blocks the next run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid

import dagster as dg
import pytest

from heimdex_clip_assets import services
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.defs.run_health import WORKER_TAG, dead_runs_sensor
from tests.faults.conftest import POOL, StallingEndpoint
from tests.fixtures.cli import ROOT, run_cli


def start_stalled_run(
    env: dict[str, str], video_id: str, endpoint: StallingEndpoint
) -> subprocess.Popen[str]:
    """process-video, stopped inside the embedding step (its slot held) until the endpoint answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "heimdex_clip_assets.cli", "process-video", "--video-id", video_id],
        env={
            **env,
            "CLIP_INFERENCE_BACKEND": "runpod",
            "RUNPOD_CLIP_ENDPOINT_URL": endpoint.url,
            # A model version no scene has yet: every scene is to embed, whatever earlier tests stored.
            "CLIP_MODEL_VERSION": f"stalled-{uuid.uuid4().hex[:8]}",
        },
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if not endpoint.hit.wait(180):
        proc.kill()
        raise AssertionError(f"the run never reached the endpoint: {proc.communicate()}")
    return proc


def slots_held(instance: dg.DagsterInstance) -> int:
    return instance.event_log_storage.get_concurrency_info(POOL).active_slot_count


def last_run(instance: dg.DagsterInstance) -> dg.DagsterRun:
    return instance.get_runs(limit=1)[0]


def one_sentence(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) <= 3, stderr  # one sentence, wrapped by the console at most twice
    return " ".join(lines)


def test_a_killed_runs_slot_is_freed_for_the_next_run(
    env: dict[str, str], video_id: str, instance: dg.DagsterInstance, stalling_endpoint: StallingEndpoint
) -> None:
    proc = start_stalled_run(env, video_id, stalling_endpoint)
    killed = last_run(instance)
    assert slots_held(instance) == 1 and killed.tags[WORKER_TAG].split(":")[1] == str(proc.pid)
    proc.kill()
    proc.wait()
    assert slots_held(instance) == 1  # nothing in the dead process could give it back

    # The next command frees it before its own run asks for the one slot (today: blocked forever).
    started = time.monotonic()
    done = run_cli(env, "process-video", "--video-id", video_id, "--backend", "local", timeout=240)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 240
    record = instance.get_run_record_by_id(killed.run_id)
    assert record is not None and record.dagster_run.status == dg.DagsterRunStatus.FAILURE
    assert slots_held(instance) == 0


def test_the_sensor_frees_a_killed_runs_slot(
    env: dict[str, str], video_id: str, instance: dg.DagsterInstance, stalling_endpoint: StallingEndpoint
) -> None:
    """Under `heimdex-clip dev` the daemon evaluates this sensor every 30 s: the bound with no new run."""
    proc = start_stalled_run(env, video_id, stalling_endpoint)
    killed = last_run(instance)
    proc.kill()
    proc.wait()
    assert slots_held(instance) == 1
    with dg.build_sensor_context(instance=instance) as context:
        dead_runs_sensor(context)
    assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE
    assert slots_held(instance) == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_says_what_happened(
    env: dict[str, str],
    video_id: str,
    instance: dg.DagsterInstance,
    stalling_endpoint: StallingEndpoint,
    signum: int,
) -> None:
    proc = start_stalled_run(env, video_id, stalling_endpoint)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    message = one_sentence(stderr)
    assert proc.returncode == 130, stderr
    assert "Interrupted by a signal" in message and "scene_clip_embeddings" in message
    assert "failed unexpectedly" not in message
    assert slots_held(instance) == 0
    assert last_run(instance).status == dg.DagsterRunStatus.FAILURE


def test_postgres_stopped_mid_run_ends_in_one_sentence(
    env: dict[str, str], video_id: str, instance: dg.DagsterInstance, stalling_endpoint: StallingEndpoint
) -> None:
    proc = start_stalled_run(env, video_id, stalling_endpoint)
    cut_off = last_run(instance)
    settings = Settings.from_env({"HEIMDEX_HOME": env["HEIMDEX_HOME"]})
    postgres = services.embedded_postgres(settings.home)
    postgres.stop()
    stalling_endpoint.release()  # the run carries on, and meets the missing database
    _, stderr = proc.communicate(timeout=240)
    message = one_sentence(stderr)
    assert proc.returncode == 2, stderr
    assert "Postgres" in message

    # Postgres back: the next command fails the cut-off run and frees its slot before running.
    postgres.start()
    done = run_cli(env, "process-video", "--video-id", video_id, "--backend", "local", timeout=240)
    assert done.returncode == 0, done.stderr
    assert instance.get_run_by_id(cut_off.run_id).status == dg.DagsterRunStatus.FAILURE
    assert slots_held(instance) == 0


def test_a_database_url_that_is_not_a_url_is_one_sentence(env: dict[str, str], video_id: str) -> None:
    for command in (
        ["process-video", "--video-id", video_id],
        ["search", "a red car"],
        ["backfill", "--dry-run"],
    ):
        done = run_cli(env, *command, DATABASE_URL="notaurl", timeout=120)
        assert done.returncode == 2, done.stderr
        assert "DATABASE_URL" in one_sentence(done.stderr) and "notaurl" not in done.stderr
