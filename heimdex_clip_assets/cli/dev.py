"""Local services: ``dev`` (Dagster UI, daemon, embedded services) and ``storage-server``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from heimdex_clip_assets import services
from heimdex_clip_contract.errors import ClipError

from .common import (
    REPO_ROOT,
    console,
    dagster_env,
    settings_from_args,
)


def cmd_dev(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    services.vector_store(settings)  # starts the embedded Postgres (and migrates) if needed
    services.storage(settings)  # starts the embedded storage server if needed
    env = {**os.environ, **dagster_env(settings)}
    # `dg dev`, the current Dagster CLI (pyproject's [tool.dg]); `dagster dev` warns that it is superseded.
    command = [str(Path(sys.executable).parent / "dg"), "dev", "--host", args.host, "--port", str(args.port)]
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
    from heimdex_clip_assets.devservices.storage_server import ensure_storage_server

    settings = settings_from_args(args)
    server = ensure_storage_server(
        settings.home, file_size_limit=settings.storage_file_size_limit, workers=settings.storage_workers
    )
    console.print(json.dumps({"url": server.url, "service_key": server.service_key}))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    stopped = services.stop_embedded(settings)
    console.print(f"Stopped: {', '.join(stopped)}." if stopped else f"Nothing runs in {settings.home}.")
    return 0


def stop_started_services() -> None:
    """Stop the embedded services this command started (and only those), as it ends."""
    with contextlib.suppress(ClipError):  # a broken setting already ended the command with its sentence
        services.stop_embedded(settings_from_args(argparse.Namespace()), started_here_only=True)
