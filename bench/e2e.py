"""End-to-end bench: `heimdex-clip demo VIDEO` as a user runs it, wall time, x realtime, share per stage.

    .venv/bin/python bench/e2e.py [--scenes 60] [--scene-seconds 3] [--cold] [--profile]
                                  [--checkpoint PATH] [--precision fp32|bf16] [--batch 32]

The demo runs as a subprocess (interpreter start, imports, Dagster instance and run included) on embedded
Postgres + storage in a temporary HEIMDEX_HOME, with the local CLIP backend and the CLI's own
DAGSTER_PG_URL and DAGSTER_ARTIFACTS_DIR (DAGSTER_HOME is a copy of the repo's: see main). The embedded
services are started first and timed apart (a fresh state folder's one-time cost: initdb + migrations);
--cold leaves that to the demo. The per-stage split comes from the finished Dagster run itself: step
start/end times from its event log, and inside the steps the lib's own timers from the materialization
metadata (scene_keyframes' stage_seconds, scene_clip_embeddings' wall_s), so the figures are the run's,
not a re-run's. What is left is process start-up, model load and Dagster overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import add_video_args, clip_env, isolated_home, load_note, sample_video, timed

from heimdex_clip_assets import services
from heimdex_clip_assets.cli.common import REPO_ROOT
from heimdex_clip_assets.config import Settings

TARGET_X = 15.0
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
# Embedding while detecting (process-video, demo): "model_wait" for the model before detection starts,
# "embed" what is left of the embedding once detection is over.
KEYFRAME_STAGES = ("download", "model_wait", "detect", "thumbnails", "upload", "db", "embed")


def adopt_orphans() -> None:
    """Become the subreaper of the demo's own children (the model's process outlives the command by a
    moment, orphaned), so their CPU counts in RUSAGE_CHILDREN once :func:`reap_orphans` waits for them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def own_children() -> set[int]:
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                pids.add(int(stat.parent.name))
    return pids


def reap_orphans(before: set[int], timeout_s: float = 10.0) -> None:
    """Wait (a while) for the children adopted since ``before``: the services this bench started stay."""
    deadline = time.monotonic() + timeout_s
    waiting = own_children() - before
    while waiting and time.monotonic() < deadline:
        for pid in list(waiting):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            waiting.discard(pid)
        time.sleep(0.05)


def batch_costs(settings: Settings, video_id: str) -> list[tuple[int, float]]:
    """(images, encode ms per image) of each local-backend batch, in order, from the scenes' metadata."""
    out: list[tuple[int, float]] = []
    for scene in services.vector_store(settings).scenes(video_id):
        meta = scene.metadata or {}
        cost = (int(meta["batch_size"]), float(meta["inference_time_ms"]))
        if not out or out[-1] != cost:  # every image of a batch carries the same share
            out.append(cost)
    return out


def run_breakdown(
    settings: Settings, started: float, ended: float
) -> tuple[dict[str, float], list[tuple[int, float]]]:
    """Seconds per part of the demo's wall time (epoch ``started``..``ended``), from its Dagster run,
    and the cost of each CLIP batch."""
    import dagster as dg

    from heimdex_clip_assets.cli.common import dagster_env

    os.environ.update(dagster_env(settings))
    instance = dg.DagsterInstance.get()
    (run,) = instance.get_runs(limit=1)
    run_stats = instance.get_run_stats(run.run_id)
    steps = sorted(instance.get_run_step_stats(run.run_id), key=lambda s: s.start_time or 0.0)
    meta: dict[str, dict[str, object]] = {}
    for record in instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records:
        materialization = record.event_log_entry.asset_materialization
        assert materialization is not None
        meta[materialization.asset_key.to_user_string()] = {
            k: getattr(v, "value", v) for k, v in materialization.metadata.items()
        }

    assert run_stats.start_time and run_stats.end_time, run_stats
    parts = {"start-up: interpreter, imports, services, register, instance": run_stats.start_time - started}
    previous_end = run_stats.start_time
    for step in steps:
        assert step.start_time and step.end_time, step
        parts["dagster: between steps"] = parts.get("dagster: between steps", 0.0) + (
            step.start_time - previous_end
        )
        previous_end = step.end_time
        step_s = step.end_time - step.start_time
        inner: dict[str, float] = {}
        if step.step_key == "scene_keyframes":
            seconds = meta["scene_keyframes"]["stage_seconds"]
            assert isinstance(seconds, dict), seconds
            inner = {f"keyframes: {k}": float(seconds[k]) for k in KEYFRAME_STAGES if k in seconds}
        elif step.step_key == "scene_clip_embeddings":
            # The engine's wall_s: thumbnail reads + decode + encode + the DB writes. The rest of the
            # step is mostly the model load (the local backend is built inside the step).
            inner = {"embeddings: engine": float(meta["scene_clip_embeddings"]["wall_s"])}
        parts.update(inner)
        parts[f"{step.step_key}: rest of step"] = step_s - sum(inner.values())
    parts["dagster: after last step"] = run_stats.end_time - previous_end
    parts["after run: table, exit"] = ended - run_stats.end_time
    return parts, batch_costs(settings, run.tags["dagster/partition"])


@dataclass
class DemoRun:
    wall: float
    cpu_s: float
    duration: float
    summary: str
    parts: dict[str, float]
    batch_ms: list[tuple[int, float]]
    services_s: float


def run_demo(args: argparse.Namespace, code: Path | None) -> DemoRun:
    """One `heimdex-clip demo` in a fresh HEIMDEX_HOME, of this checkout's code or of ``code``'s."""
    with isolated_home() as home:
        os.environ.update(clip_env(args, home))
        video, duration = sample_video(args, home)
        settings = Settings.from_env()
        services_s = 0.0
        if not args.cold:
            _, services_s = timed(lambda: (services.vector_store(settings), services.storage(settings)))
            print(
                f"embedded services, first start in a fresh HEIMDEX_HOME: {services_s:.2f} s (not in total)"
            )
        print(load_note())

        # The CLI's default DAGSTER_HOME is the checkout, and Dagster's default compute-log manager
        # writes <DAGSTER_HOME>/storage/<run id>/ there: a copy of the same dagster.yaml keeps them here.
        dagster_home = home / "dagster-home"
        dagster_home.mkdir()
        shutil.copy(REPO_ROOT / "dagster.yaml", dagster_home)
        os.environ["DAGSTER_HOME"] = str(dagster_home)
        env = dict(os.environ)
        if code is not None:  # the other checkout's package first on the path, in the same venv
            env["PYTHONPATH"] = os.pathsep.join([str(code), *env.get("PYTHONPATH", "").split(os.pathsep)])
        cli = Path(sys.prefix) / "bin" / "heimdex-clip"
        profile = home / "demo.prof"
        command = [str(cli), "demo", str(video)]
        if args.profile:
            # The command ends in os._exit (no interpreter teardown), which `python -m cProfile` never
            # survives to write its file: profile main() itself, imports included.
            runner = (
                "import cProfile, sys; p = cProfile.Profile(); p.enable()\n"
                "from heimdex_clip_assets.cli import main\n"
                "code = main(sys.argv[2:]); p.disable(); p.dump_stats(sys.argv[1]); sys.exit(code)"
            )
            command = [sys.executable, "-c", runner, str(profile), "demo", str(video)]
        adopt_orphans()
        children = own_children()
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.time()
        proc, wall = timed(
            lambda: subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        )
        ended = time.time()
        reap_orphans(children)
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU seconds are steadier than wall time on a shared machine, and cpu / wall says how much of
        # the cores the demo kept busy: what overlapping its stages can still win.
        cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        if proc.returncode != 0:
            sys.exit(f"demo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        parts, batch_ms = run_breakdown(settings, started, ended)
        if args.profile:
            pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(25)
    summary = re.search(r"(\d+) scenes from .*realtime\)", proc.stdout)
    return DemoRun(wall, cpu_s, duration, summary.group(0) if summary else "?", parts, batch_ms, services_s)


def report(run: DemoRun) -> None:
    print(f"demo says: {run.summary} (its timer starts after imports)")
    print(f"{'part':62s} {'seconds':>8s} {'share':>6s}")
    for name, seconds in run.parts.items():
        print(f"{name:62s} {seconds:8.2f} {seconds / run.wall:6.1%}")
    # The demo's encoder is cold: the first forward pass of each batch shape pays oneDNN's setup.
    print("encode_bytes per batch: " + ", ".join(f"{n} img @ {ms:.0f} ms/img" for n, ms in run.batch_ms))
    x = run.duration / run.wall
    verdict = "ok" if x >= TARGET_X else "MISSED"
    cores = f"{run.cpu_s / run.wall:.2f} of {os.cpu_count()} cores on average"
    print(f"demo CPU: {run.cpu_s:.2f} s (user + sys) = {cores}")
    print(f"total: {run.wall:.2f} s for {run.duration:.0f} s of video = {x:.1f}x realtime", end=" ")
    print(f"(target >= {TARGET_X:g}x: {verdict})")
    if run.services_s:
        print(f"with the first services start: {run.duration / (run.wall + run.services_s):.1f}x realtime")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_video_args(parser, scenes=60, scene_seconds=3.0)
    parser.add_argument("--cold", action="store_true", help="let the demo start the embedded services")
    parser.add_argument("--profile", action="store_true", help="run the demo under cProfile; print top 25")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. `git worktree add /tmp/base main`): its demo and this one's run in "
        "turns, --rounds times each, on the same video and machine, and the medians are compared",
    )
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side with --baseline (default 2)")
    args = parser.parse_args()

    if args.baseline is None:
        run = run_demo(args, None)
        report(run)
        print(load_note())
        return
    runs: dict[str, list[DemoRun]] = {"baseline": [], "this checkout": []}
    for round_no in range(args.rounds):
        for side, code in (("baseline", args.baseline.resolve()), ("this checkout", None)):
            print(f"--- round {round_no + 1}: {side}")
            run = run_demo(args, code)
            report(run)
            runs[side].append(run)
    print(f"--- {args.rounds} round(s), alternating; median of each side")
    for side, side_runs in runs.items():
        wall = statistics.median(r.wall for r in side_runs)
        cpu = statistics.median(r.cpu_s for r in side_runs)
        duration = side_runs[0].duration
        walls = ", ".join(f"{r.wall:.1f}" for r in side_runs)
        print(f"{side:14s} {duration / wall:5.1f}x realtime  wall {wall:5.2f} s ({walls})  CPU {cpu:5.2f} s")
    print(load_note())


if __name__ == "__main__":
    main()
