"""What every command shares: the consoles, settings from flags, and running a partition in-process."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from heimdex_clip_assets import services
from heimdex_clip_assets.adapters.storage import object_path
from heimdex_clip_assets.adapters.weights import check_weights
from heimdex_clip_assets.config import Settings
from heimdex_clip_contract.errors import ClipError, ConfigError, InvalidRequestError, NotFoundError
from heimdex_clip_contract.schema import weights_are_random

console = Console(soft_wrap=True)  # long lines wrap in the terminal, not mid-sentence by us
err_console = Console(stderr=True, soft_wrap=True)
REPO_ROOT = Path(__file__).resolve().parents[2]

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


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings.from_env(backend=getattr(args, "backend", None))


def require_weights(settings: Settings) -> None:
    """Fail in seconds, before any work, when the in-process model's weights cannot be had."""
    if settings.clip_backend == "local":
        check_weights(settings.clip_model_name, settings.clip_pretrained)


def random_weights_note(settings: Settings) -> str | None:
    """What results made with random weights say beside them: their vectors and scores mean nothing."""
    return "random weights: vectors mean nothing" if weights_are_random(settings.clip_pretrained) else None


def video_id_arg(text: str) -> str:
    """A video id as the user typed it, checked before it reaches the database."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise InvalidRequestError(
            f"{text!r} is not a video id (ids are UUIDs, as `heimdex-clip add-video` prints them)"
        ) from None


def dagster_env(settings: Settings) -> dict[str, str]:
    """The instance to use: the project's ``dagster.yaml`` (unless ``DAGSTER_HOME`` names another), which
    finds Postgres and the artifacts folder from the same settings as the pipeline."""
    home = os.environ.get("DAGSTER_HOME") or str(REPO_ROOT)
    if not (Path(home) / "dagster.yaml").is_file():
        raise ConfigError(
            f"No dagster.yaml in DAGSTER_HOME={home}; point DAGSTER_HOME at the folder holding the "
            "project's dagster.yaml"
        )
    return {"DAGSTER_HOME": home, "HEIMDEX_HOME": str(settings.home)}


def materialize_video(video_id: str, settings: Settings) -> None:
    """Run every asset (and check) of one video's partition now, in this process."""
    require_weights(settings)  # before Dagster's imports: seconds matter to a command that cannot run
    import dagster as dg

    from heimdex_clip_assets.definitions import defs
    from heimdex_clip_assets.defs.partitions import video_labels, videos_partitions
    from heimdex_clip_assets.defs.run_health import reap_dead_runs

    store = services.vector_store(settings)
    video = store.get_video(video_id)
    if video is None:
        raise NotFoundError(f"Unknown video id {video_id}; add it first with `heimdex-clip add-video FILE`")
    os.environ.update(dagster_env(settings))
    instance = dg.DagsterInstance.get()
    # Runs killed earlier (SIGKILL, a lost database) may still hold clip_inference slots this run needs.
    reap_dead_runs(instance)
    instance.add_dynamic_partitions(videos_partitions.name, [video_id])
    # Dagster also writes straight to stderr when it cannot store an event (a lost database); the
    # command ends with its own sentence instead. HEIMDEX_DEBUG=1 shows everything.
    quiet = (
        contextlib.nullcontext()
        if os.environ.get("HEIMDEX_DEBUG")
        else contextlib.redirect_stderr(io.StringIO())
    )
    with quiet:
        result = (
            defs()
            .resolve_job_def("ingest_video")
            .execute_in_process(
                partition_key=video_id,
                instance=instance,
                tags=video_labels(video),
                raise_on_error=False,
                run_config={
                    # The command's backend (a --backend flag included) for the assets and the checks.
                    "resources": {"clip": {"config": {"backend": settings.clip_backend}}},
                    # A person waits for this one video: with the local backend, its keyframes are
                    # embedded while it is still being decoded (no other run shares this process).
                    "ops": {"scene_keyframes": {"config": {"embed_while_detecting": True}}},
                    # The command prints its own results and one-sentence errors; Dagster's console log
                    # would add every step event and, on failure, a traceback. The run's full log stays
                    # in the instance.
                    "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
                },
            )
        )
    if not result.success:
        raise _run_failure(result, video_id)


class InterruptedRunError(ClipError):
    """The command was stopped by a signal (Ctrl-C, SIGTERM) while its run was in a step."""

    code = "interrupted"


# What Dagster records for a step stopped by SIGINT, or by SIGTERM, which it maps to SIGINT while it runs.
_INTERRUPTS = ("DagsterExecutionInterruptedError", "KeyboardInterrupt")


def _run_failure(result: Any, video_id: str) -> ClipError:
    """The first failed step's description: the assets turn our errors (and interruptions) into failures
    that say what to do; anything else is a bug, whose details are in the run's logs."""
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            error = data.error
            user = data.user_failure_data
            code = user.metadata.get("code") if user else None
            if (code is not None and code.value == "interrupted") or (
                error and error.cls_name in _INTERRUPTS
            ):
                return InterruptedRunError(
                    f"Interrupted by a signal (Ctrl-C or SIGTERM) during {event.step_key}: the run is "
                    "marked failed and its clip_inference slot is free again; run `heimdex-clip "
                    f"process-video --video-id {video_id}` to finish (scenes already embedded are kept)"
                )
            if user and user.description:
                return ClipError(user.description)
            detail = error.message.strip() if error is not None else ""
            return ClipError(
                f"Step {event.step_key} failed unexpectedly ({detail or 'no message'}); the run's log in the "
                "Dagster UI (`heimdex-clip dev`) has the details"
            )
    return ClipError("The run failed; open the Dagster UI (`heimdex-clip dev`) for its logs")


def thumbnail_label(url: str | None, bucket: str) -> str:
    """A thumbnail as a table shows it: its path in the bucket (a whole URL would be cut by the table)."""
    if url is None:
        return "-"
    try:
        return object_path(url, bucket)
    except ClipError:
        return url


def print_scenes(settings: Settings, video_id: str) -> None:
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
            thumbnail_label(scene.thumbnail_url, settings.bucket),
        )
    console.print(table)
