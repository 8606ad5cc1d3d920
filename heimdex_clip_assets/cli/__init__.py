"""heimdex-clip: turn videos into searchable CLIP scene embeddings, from the command line.

Every failure a user can cause ends in one sentence on stderr saying what to do, and a non-zero exit;
tracebacks are for bugs only (set HEIMDEX_DEBUG=1 to see them for any error).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from heimdex_clip_contract.errors import ClipError

from .backfill import cmd_backfill
from .common import err_console
from .dev import cmd_dev, cmd_storage_server
from .search import cmd_search
from .smoke import cmd_smoke
from .videos import cmd_add_video, cmd_demo, cmd_process_video


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
