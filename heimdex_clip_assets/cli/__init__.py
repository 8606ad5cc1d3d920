"""heimdex-clip cuts videos into scenes, embeds a keyframe of each with CLIP (on this machine or a RunPod
GPU) into PostgreSQL + pgvector, and finds scenes by text or image. Start with `heimdex-clip demo`.

Every failure a user can cause ends in one sentence on stderr saying what to do, and a non-zero exit;
tracebacks are for bugs only (set HEIMDEX_DEBUG=1 to see them for any error).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from heimdex_clip_contract.errors import ClipError, DatabaseError

from .backfill import cmd_backfill
from .common import InterruptedRunError, err_console
from .dev import cmd_dev, cmd_stop, cmd_storage_server, stop_started_services
from .search import cmd_search
from .serve import add_serve_parser
from .smoke import cmd_smoke
from .videos import cmd_add_video, cmd_demo, cmd_process_video

# ------------------------------------------------------------------------------------------- parser
KEEP_SERVICES_HELP = (
    "Leave the embedded PostgreSQL and storage server running when the command ends (by default it "
    "stops those it started; `heimdex-clip stop` stops them later)."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heimdex-clip", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help_text: str, *, backend: bool = True, keep_services: str | None = KEEP_SERVICES_HELP
    ) -> argparse.ArgumentParser:
        """A subcommand; ``keep_services`` is the help of its --keep-services (None: it has none)."""
        p = sub.add_parser(name, help=help_text, description=help_text)
        if backend:
            p.add_argument(
                "--backend",
                choices=("runpod", "local", "off"),
                help="Where CLIP runs, for this command only (default: CLIP_INFERENCE_BACKEND, else local).",
            )
        if keep_services:
            p.add_argument("--keep-services", action="store_true", help=keep_services)
        return p

    p = command("add-video", "Upload video files to storage and register them.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="Video files (mp4, mov, mkv, webm, avi, m4v).")
    p.add_argument(
        "--owner-id",
        metavar="UUID",
        help="The user (auth.users id) the videos belong to (default: HEIMDEX_OWNER_ID, else a local user).",
    )
    p.set_defaults(func=cmd_add_video)

    p = command("process-video", "Materialize every asset of one video now; print its scenes.")
    p.add_argument(
        "--video-id", required=True, metavar="ID", help="The video's id, as add-video printed it (a UUID)."
    )
    p.set_defaults(func=cmd_process_video)

    p = command("backfill", "Embed scenes without a current CLIP embedding (resumable).")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="Images per job (default: CLIP_BATCH_SIZE, 256 for runpod, 32 local).",
    )
    p.add_argument(
        "--clip-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="Deadline per RunPod job, retries included (default: RUNPOD_TIMEOUT_S, else 60).",
    )
    p.add_argument("--force-regenerate", action="store_true", help="Re-embed every scene.")
    p.add_argument("--dry-run", action="store_true", help="Show what would be processed, change nothing.")
    p.set_defaults(func=cmd_backfill)

    p = command(
        "smoke",
        "Check the configured CLIP backend end to end: storage, signed URLs, authentication, one "
        "embedding; one line per check.",
    )
    p.set_defaults(func=cmd_smoke)

    p = command("search", "Find scenes by text (CLIP text encoder) or by an image.")
    p.add_argument("query", nargs="?", help='What to look for, e.g. "a red car".')
    p.add_argument("--image", metavar="PATH", help="Find scenes that look like this image instead.")
    p.add_argument("--video-id", metavar="ID", help="Only scenes of this video (default: every video).")
    p.add_argument(
        "--user-id", metavar="UUID", help="Only this user's videos (their owner_id), as filter_user_id does."
    )
    p.add_argument(
        "--limit", type=int, default=10, metavar="N", help="How many scenes (default: %(default)s)."
    )
    p.set_defaults(func=cmd_search)

    add_serve_parser(command("serve", "The search API and page (HTTP): text or image in, scenes out."))

    p = command(
        "dev",
        "Embedded Postgres + storage + `dagster dev` (UI, sensor, schedule).",
        keep_services="Leave the embedded PostgreSQL and storage server running on exit.",
    )
    p.add_argument("--host", default="127.0.0.1", help="Address of the UI (default: %(default)s).")
    p.add_argument("--port", type=int, default=3000, help="Port of the UI (default: %(default)s).")
    p.set_defaults(func=cmd_dev)

    p = command("demo", "The main job end to end on embedded defaults; prints the Step-7 table.")
    p.add_argument("video", nargs="?", help="A video file (default: generate a sample).")
    p.add_argument(
        "--scenes",
        type=int,
        default=8,
        metavar="N",
        help="Scenes in the generated sample (default: %(default)s).",
    )
    p.add_argument(
        "--scene-seconds",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="Length of each generated scene (default: %(default)s).",
    )
    p.set_defaults(func=cmd_demo)

    # The embedded services themselves: no CLIP, nothing to keep running afterwards.
    for name, help_text, func in (
        (
            "storage-server",
            "Start (or find) the embedded storage server; print its URL and key. It keeps running.",
            cmd_storage_server,
        ),
        (
            "stop",
            "Stop the embedded PostgreSQL and storage server of HEIMDEX_HOME; their data stays.",
            cmd_stop,
        ),
    ):
        command(name, help_text, backend=False, keep_services=None).set_defaults(func=func)
    return parser


# Where a lost Postgres surfaces outside our adapters: Dagster's instance storage, the drivers under it.
_DATABASE_MODULES = ("dagster_postgres", "sqlalchemy", "psycopg2", "psycopg")
_DATABASE_ERRORS = ("DagsterPostgresException", "OperationalError", "InterfaceError")


def _lost_database(exc: BaseException) -> DatabaseError | None:
    """The one sentence for an exception caused by Postgres going away, or None for any other."""
    cause: BaseException | None = exc
    while cause is not None:
        kind = type(cause)
        if kind.__module__.split(".")[0] in _DATABASE_MODULES and kind.__name__ in _DATABASE_ERRORS:
            return DatabaseError(
                "Lost the connection to Postgres (DATABASE_URL / DAGSTER_PG_URL, or the embedded one under "
                "HEIMDEX_HOME): start it again and rerun the command; a run it cut short is marked failed "
                "and its slot freed when the next command starts",
                retryable=True,
            )
        cause = cause.__cause__ or cause.__context__
    return None


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the command as Ctrl-C does: cleanly, with a sentence


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(os.environ.get("HEIMDEX_DEBUG"))
    if not debug:
        # Libraries log their own view of a failure to the root logger (open_clip, huggingface_hub);
        # the command already ends with the one sentence that says what to do.
        logging.getLogger().setLevel(logging.CRITICAL)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except ClipError as exc:
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {exc.message}", highlight=False)
        return 130 if isinstance(exc, InterruptedRunError) else 2
    except KeyboardInterrupt:
        err_console.print(
            "Interrupted by a signal (Ctrl-C or SIGTERM); what was already saved is kept, and running the "
            "command again carries on from there."
        )
        return 130
    except Exception as exc:
        lost = _lost_database(exc)
        if lost is None or debug:
            raise
        err_console.print(f"[red]error:[/red] {lost.message}", highlight=False)
        return 2
    finally:
        if hasattr(args, "keep_services") and args.func is not cmd_dev and not args.keep_services:
            stop_started_services()


def run() -> None:
    """The console entry point: ``main``, then exit without the interpreter's teardown.

    Tearing down torch and open_clip takes 1-2 s after the work is done; by then every write to
    Postgres, storage and Dagster's event log is committed, so only our own output needs flushing.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
