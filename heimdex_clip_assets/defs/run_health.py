"""Runs whose process is gone are marked failed, and their ``clip_inference`` slots freed.

A run killed with SIGKILL, or one that lost its Postgres mid-run, never reports its end: Dagster keeps it
STARTED with its op-concurrency slot claimed, so every later run waits on "Step blocked by limit for
pool clip_inference" (and counts against the run queue's limit). Dagster's run monitoring (on in
``dagster.yaml``) fails runs that never start and frees the slots of runs that have ended, but under
the default run launcher it cannot tell a dead run worker from a slow one: that launcher has no health
check. So each run records its worker process in a tag (host, pid and the process's start time, which
a recycled pid does not share), and :func:`reap_dead_runs` fails the runs whose process is gone from
this host and frees what they hold.

It runs at the start of each CLI command that runs a video, at the start of each run (the ``db``
resource's setup, before any step asks for a slot), and on the ``dead_runs_sensor`` every 30 s while
the daemon runs (``heimdex-clip dev``). A dead run's slot is therefore free before the next run asks
for one, and within a minute in any case. Runs recorded on another host are left to that host.
"""

from __future__ import annotations

import os
import socket

import dagster as dg
import psutil

WORKER_TAG = "heimdex/run_worker"
# States a run is in while its process should be alive (and may hold a slot).
_LIVE = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
_ENDED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


def _process_tag(pid: int) -> str | None:
    """``host:pid:start time`` of a live process, or None when there is none."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"{socket.gethostname()}:{pid}:{process.create_time():.2f}"
    except psutil.Error:
        return None


def tag_run_worker(instance: dg.DagsterInstance, run_id: str) -> None:
    """Record this process as the run's worker."""
    tag = _process_tag(os.getpid())
    if tag is not None:
        instance.add_run_tags(run_id, {WORKER_TAG: tag})


def _dead_here(tag: str) -> bool:
    """True when the tagged process was on this host and is gone (or its pid now names another)."""
    host, _, rest = tag.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return _process_tag(int(pid)) != tag


def reap_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Fail the runs whose worker process died on this host, and free the concurrency slots of every
    run that is no longer alive. Returns the ids of the runs it failed."""
    reaped = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=_LIVE)):
        run = record.dagster_run
        tag = run.tags.get(WORKER_TAG)
        if tag is None or not _dead_here(tag):
            continue
        instance.report_run_failed(
            run,
            f"The run's process (pid {tag.split(':')[1]}) is gone: it was killed, or lost its database, "
            "mid-run. The run is marked failed and its concurrency slots are freed; run the video again "
            "to finish it (scenes already embedded are kept).",
        )
        reaped.append(run.run_id)
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        holders = storage.get_concurrency_run_ids()
        if holders:
            for record in instance.get_run_records(dg.RunsFilter(run_ids=list(holders), statuses=_ENDED)):
                storage.free_concurrency_slots_for_run(record.dagster_run.run_id)
    return reaped


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Fails runs whose process was killed (SIGKILL, a lost database) and frees their "
    "clip_inference slots, so later runs are not blocked by them.",
)
def dead_runs_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    reaped = reap_dead_runs(context.instance)
    if reaped:
        context.log.warning(f"Failed {len(reaped)} run(s) whose process is gone: {', '.join(reaped)}")
    return dg.SkipReason(f"{len(reaped)} dead run(s) failed and their slots freed")
