"""``heimdex-clip``: the operator's command line.

Every failure a user can cause ends in one sentence on stderr saying what to do, and a non-zero exit;
tracebacks are for bugs only (set HEIMDEX_DEBUG=1 to see them for any error).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .lib import pipeline, services
from .lib.config import Settings
from .lib.errors import ClipError, ConfigError, NotFoundError

console = Console()
err_console = Console(stderr=True)
REPO_ROOT = Path(__file__).resolve().parents[1]

# The seed's Step 7 query, verbatim but for the id placeholder.
STEP7_SQL = """SELECT
  id,
  index,
  embedding_visual_clip IS NOT NULL as has_clip,
  visual_clip_metadata->>'backend' as backend,
  visual_clip_metadata->>'inference_time_ms' as inference_ms
FROM video_scenes
WHERE video_id = %s
ORDER BY index;"""


# ------------------------------------------------------------------------------------------ helpers
def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(backend=getattr(args, "backend", None))


def dagster_env(settings: Settings) -> dict[str, str]:
    """The variables ``dagster.yaml`` needs, defaulting to the embedded Postgres and the state folder."""
    from .lib.db import dagster_storage_url

    env = {
        "DAGSTER_HOME": os.environ.get("DAGSTER_HOME") or str(REPO_ROOT),
        "DAGSTER_PG_URL": os.environ.get("DAGSTER_PG_URL") or dagster_storage_url(settings),
        "DAGSTER_ARTIFACTS_DIR": os.environ.get("DAGSTER_ARTIFACTS_DIR") or str(settings.home / "dagster"),
    }
    if not (Path(env["DAGSTER_HOME"]) / "dagster.yaml").is_file():
        raise ConfigError(
            f"No dagster.yaml in DAGSTER_HOME={env['DAGSTER_HOME']}; point DAGSTER_HOME at the folder "
            "holding the project's dagster.yaml"
        )
    return env


def materialize_video(video_id: str, settings: Settings) -> None:
    """Run every asset (and check) of one video's partition now, in this process."""
    import dagster as dg

    from .definitions import defs
    from .defs.partitions import videos_partitions

    store = services.vector_store(settings)
    if store.get_video(video_id) is None:
        raise NotFoundError(f"Unknown video id {video_id}; add it first with `heimdex-clip add-video FILE`")
    os.environ.update(dagster_env(settings))
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(videos_partitions.name, [video_id])
    result = defs.resolve_job_def("ingest_video").execute_in_process(
        partition_key=video_id,
        instance=instance,
        raise_on_error=False,
        run_config={
            # The command's backend (a --backend flag included) for the assets and the checks alike.
            "resources": {"clip": {"config": {"backend": settings.clip_backend}}},
            # The command prints its own results and one-sentence errors; Dagster's console log would add
            # every step event and, on failure, a traceback. The run's full log stays in the instance.
            "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
        },
    )
    if not result.success:
        raise ClipError(_run_failure_message(result))


def _run_failure_message(result: Any) -> str:
    """The first failed step's description: the assets turn our errors into failures that say what to
    do; anything else is a bug, whose details are in the run's logs."""
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            if data.user_failure_data and data.user_failure_data.description:
                return data.user_failure_data.description
            return f"Step {event.step_key} failed unexpectedly: {data.error.message.strip()}"
    return "The run failed; open the Dagster UI (`heimdex-clip dev`) for its logs"


def _print_scenes(settings: Settings, video_id: str) -> None:
    table = Table(title=f"video {video_id}")
    for column in ("scene", "time", "has_clip", "backend", "inference_ms", "thumbnail"):
        table.add_column(column)
    for scene in services.vector_store(settings).scenes(video_id):
        meta = scene.metadata or {}
        table.add_row(
            str(scene.index),
            f"{scene.start_s:.2f}-{scene.end_s:.2f}s",
            "true" if scene.embedding is not None else "false",
            str(meta.get("backend", "-")),
            f"{float(meta['inference_time_ms']):.1f}" if "inference_time_ms" in meta else "-",
            scene.thumbnail_path,
        )
    console.print(table)


# ----------------------------------------------------------------------------------------- commands
def cmd_add_video(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store, storage = services.vector_store(settings), services.storage(settings)
    for path in args.paths:
        video_id = pipeline.register_video(Path(path), store=store, storage=storage)
        console.print(f"{video_id}  {path}")
    console.print(
        "Registered. The sensor of `heimdex-clip dev` picks them up, or run "
        "`heimdex-clip process-video --video-id ID` now."
    )
    return 0


def cmd_process_video(args: argparse.Namespace) -> int:
    settings = _settings(args)
    materialize_video(args.video_id, settings)
    _print_scenes(settings, args.video_id)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .lib.sample_video import generate_sample_video

    settings = _settings(args)
    if args.video:
        video = Path(args.video)
    else:
        video = settings.home / "samples" / f"sample-{args.scenes}x{args.scene_seconds:g}s.mp4"
        if not video.exists():
            video.parent.mkdir(parents=True, exist_ok=True)
            console.print(f"Generating a sample 720p video with {args.scenes} scenes: {video}")
            generate_sample_video(video, scenes=args.scenes, scene_seconds=args.scene_seconds)
    started = time.perf_counter()
    store, storage = services.vector_store(settings), services.storage(settings)
    video_id = pipeline.register_video(video, store=store, storage=storage)
    console.print(
        f"Video {video_id} registered; running scene_keyframes -> scene_signed_urls -> "
        f"scene_clip_embeddings (backend={settings.clip_backend})"
    )
    materialize_video(video_id, settings)
    wall = time.perf_counter() - started
    rows = store.query(STEP7_SQL, (video_id,))
    table = Table(title="Step 7: video_scenes")
    for column in ("scene", "has_clip", "backend", "inference_ms"):
        table.add_column(column)
    for row in rows:
        ms = row["inference_ms"]
        table.add_row(
            str(row["index"]),
            str(row["has_clip"]).lower(),
            str(row["backend"]),
            f"{float(ms):.1f}" if ms is not None else "-",
        )
    console.print(table)
    video_rec = store.get_video(video_id)
    duration = video_rec.duration_s if video_rec and video_rec.duration_s else 0.0
    console.print(
        f"{len(rows)} scenes from {duration:.1f}s of video in {wall:.1f}s "
        f"({duration / wall if wall else 0:.1f}x realtime)"
    )
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from .lib.backfill import run_backfill

    settings = (
        dataclasses.replace(_settings(args), runpod_timeout_s=args.clip_timeout)
        if args.clip_timeout
        else _settings(args)
    )
    return run_backfill(
        settings,
        batch_size=args.batch_size,
        force=args.force_regenerate,
        dry_run=args.dry_run,
        console=console,
    )


def cmd_smoke(args: argparse.Namespace) -> int:
    from .lib.smoke import run_smoke

    checks = run_smoke(_settings(args))
    for check in checks:
        mark = "[green]✓[/green]" if check.ok else "[red]✗[/red]"
        console.print(f"{mark} {check.message}")
    return 0 if all(c.ok for c in checks) else 1


def cmd_search(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if bool(args.query) == bool(args.image):
        raise ConfigError('Give a text query or --image PATH, e.g. heimdex-clip search "a red car"')
    encoder = services.text_image_encoder(settings)
    if args.image:
        image = Path(args.image)
        if not image.is_file():
            raise NotFoundError(f"No such image: {image}; check the path")
        result = encoder.encode_bytes([image.read_bytes()])[0]
        if isinstance(result, ClipError):
            raise result
        vector = result
    else:
        vector = encoder.encode_text([args.query])[0]
    hits = services.vector_store(settings).search(
        vector, k=args.limit, video_id=args.video_id, model_version=settings.clip_model_version
    )
    if not hits:
        console.print("No scenes with embeddings yet; run `heimdex-clip demo` or `process-video` first.")
        return 0
    table = Table(title=f"search: {args.query or args.image}")
    for column in ("video", "scene", "time", "score", "thumbnail"):
        table.add_column(column)
    for hit in hits:
        table.add_row(
            hit.video_id,
            str(hit.index),
            f"{hit.start_s:.2f}-{hit.end_s:.2f}s",
            f"{hit.score:.3f}",
            hit.thumbnail_path,
        )
    console.print(table)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    settings = _settings(args)
    services.vector_store(settings)  # starts the embedded Postgres (and migrates) if needed
    services.storage(settings)  # starts the embedded storage server if needed
    env = {**os.environ, **dagster_env(settings)}
    Path(env["DAGSTER_ARTIFACTS_DIR"]).mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(REPO_ROOT / "workspace.yaml"),
        "-h",
        args.host,
        "-p",
        str(args.port),
    ]
    console.print(f"Dagster UI on http://{args.host}:{args.port}  (Ctrl-C stops it)")
    # Its own process group: the terminal's Ctrl-C reaches only us, and we pass it on to the whole group
    # (webserver, daemon, code servers) so nothing is left running, then wait for a clean shutdown.
    proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        return 0
    finally:
        if not args.keep_services:
            services.stop_embedded(settings)


def cmd_storage_server(args: argparse.Namespace) -> int:
    from .lib.storage_server import ensure_storage_server

    server = ensure_storage_server(_settings(args).home)
    console.print(json.dumps({"url": server.url, "service_key": server.service_key}))
    return 0


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heimdex-clip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--backend",
            choices=("runpod", "local", "off"),
            help="Overrides CLIP_INFERENCE_BACKEND for this command.",
        )
        return p

    p = command("add-video", "Upload video files to storage and register them.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_add_video)

    p = command("process-video", "Materialize every asset of one video now; print its scenes.")
    p.add_argument("--video-id", required=True)
    p.set_defaults(func=cmd_process_video)

    p = command("backfill", "Embed scenes without a current CLIP embedding (resumable).")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--clip-timeout", type=float, default=None, help="Seconds per RunPod request.")
    p.add_argument("--force-regenerate", action="store_true", help="Re-embed every scene.")
    p.add_argument("--dry-run", action="store_true", help="Show what would be processed.")
    p.set_defaults(func=cmd_backfill)

    p = command("smoke", "The seed's smoke test of the configured backend.")
    p.set_defaults(func=cmd_smoke)

    p = command("search", "Find scenes by text (CLIP text encoder) or by an image.")
    p.add_argument("query", nargs="?")
    p.add_argument("--image")
    p.add_argument("--video-id")
    p.add_argument("--limit", type=int, default=10)
    p.set_defaults(func=cmd_search)

    p = command("dev", "Embedded Postgres + storage + `dagster dev` (UI, sensor, schedule).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument(
        "--keep-services",
        action="store_true",
        help="Leave the embedded Postgres and storage server running on exit.",
    )
    p.set_defaults(func=cmd_dev)

    p = command("demo", "The main job end to end on embedded defaults; prints the Step-7 table.")
    p.add_argument("video", nargs="?", help="A video file (default: generate a sample).")
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--scene-seconds", type=float, default=3.0)
    p.set_defaults(func=cmd_demo)

    p = command("storage-server", "Start (or find) the embedded storage server; print its URL and key.")
    p.set_defaults(func=cmd_storage_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.environ.get("HEIMDEX_DEBUG"):
        # Libraries log their own view of a failure to the root logger (open_clip, huggingface_hub);
        # the command already ends with the one sentence that says what to do.
        logging.getLogger().setLevel(logging.CRITICAL)
    try:
        return args.func(args)
    except ClipError as exc:
        if os.environ.get("HEIMDEX_DEBUG"):
            raise
        err_console.print(f"[red]error:[/red] {exc.message}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("Interrupted.")
        return 130


def run() -> None:
    """The console entry point: ``main``, then exit without the interpreter's teardown.

    Tearing down torch and open_clip takes 1-2 s after the work is done; by then every write to
    Postgres, storage and Dagster's event log is committed, so only our own output needs flushing.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
