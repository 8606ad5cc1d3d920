"""``heimdex-clip serve``: the search API and page on uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import os
from typing import Any

from heimdex_clip_assets import services

from .common import console, settings_from_args

LOOPBACK = "127.0.0.1"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from heimdex_clip_assets.serve.app import app_from_env

    if args.backend:  # the app reads the environment (in every worker process)
        os.environ["CLIP_INFERENCE_BACKEND"] = args.backend
    settings = settings_from_args(args)
    host = args.host
    if not (settings.search_api_keys or settings.supabase_jwt_secret):
        # Without credentials every caller sees every tenant's scenes: only this machine may call.
        host = host if _is_loopback(host) else LOOPBACK
        console.print(
            f"No SEARCH_API_KEYS or SUPABASE_JWT_SECRET is set: serving WITHOUT authentication, on {host} "
            "only. Set one of them to serve other machines."
        )
    # One worker: the app is built here, so a bad setting ends in one sentence before uvicorn starts.
    # Several: each worker process builds its own from the environment (one model load each), after
    # this process has started (or found) the embedded services and migrated, so they do not race.
    if args.workers == 1:
        app: Any = app_from_env()
    else:
        services.vector_store(settings)
        services.storage(settings)
        app = "heimdex_clip_assets.serve.app:app_from_env"
    console.print(
        f"Search on http://{host}:{args.port}{args.root_path}/  (API docs at /docs; backend "
        f"{settings.clip_backend}; Ctrl-C stops it)"
    )
    uvicorn.run(
        app,
        factory=args.workers > 1,
        host=host,
        port=args.port,
        workers=args.workers,
        root_path=args.root_path,
        proxy_headers=True,
        forwarded_allow_ips=args.forwarded_allow_ips,
        log_level="warning",
    )
    return 0


def add_serve_parser(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--host",
        default=LOOPBACK,
        help="Address to listen on; without API keys or a JWT secret only loopback (default: %(default)s).",
    )
    command.add_argument("--port", type=int, default=8080, help="Port to listen on (default: %(default)s).")
    command.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes (default: %(default)s)."
    )
    command.add_argument(
        "--root-path",
        default="",
        help="The path prefix a reverse proxy serves this under, e.g. /search (default: none)",
    )
    command.add_argument(
        "--forwarded-allow-ips",
        default=LOOPBACK,
        help="Proxies whose X-Forwarded-* headers are trusted, comma-separated or * (default: %(default)s)",
    )
    command.set_defaults(func=cmd_serve)
