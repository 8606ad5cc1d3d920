"""Starting local servers: a free loopback port, an app served in a thread, whether a URL answers, and
the one wait-until-ready loop that the embedded storage server, the tests and the benches use.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


class NotReadyError(RuntimeError):
    """What :func:`wait_until` waited for did not happen: ``exited`` when the process ended first (its
    return code), None when time ran out."""

    def __init__(self, message: str, *, exited: int | None = None) -> None:
        super().__init__(message)
        self.exited = exited


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (another process may take it before the caller binds it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def answers(url: str, *, any_status: bool = False, timeout_s: float = 2.0) -> bool:
    """Whether a GET of ``url`` answers 200 (any HTTP answer at all with ``any_status``)."""
    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError:
        return False
    return any_status or response.status_code == 200


def port_file_url(port_file: Path, health_path: str, *, any_status: bool = False) -> str | None:
    """``http://127.0.0.1:<port>`` once a server started with ``--port-file`` wrote its port there and
    ``health_path`` answers (see :func:`answers`); None until then."""
    port = port_file.read_text().strip() if port_file.exists() else ""
    url = f"http://127.0.0.1:{port}"
    return url if port and answers(url + health_path, any_status=any_status) else None


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a free port in a background thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until("uvicorn", lambda: server.started, timeout_s=30, interval_s=0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_until(
    what: str,
    ready: Callable[[], T],
    *,
    timeout_s: float,
    proc: subprocess.Popen | None = None,
    interval_s: float = 0.05,
) -> T:
    """Call ``ready`` every ``interval_s`` until it returns something truthy, and return that.

    Raises :class:`NotReadyError` when ``proc`` (the process being waited for) exits first, or after
    ``timeout_s``; the message starts with ``what``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise NotReadyError(f"{what}: the process exited with {proc.returncode}", exited=proc.returncode)
        result = ready()
        if result:
            return result
        if time.monotonic() > deadline:
            raise NotReadyError(f"{what}: not within {timeout_s:g} s")
        time.sleep(interval_s)
