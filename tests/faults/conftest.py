"""Fault-suite fixtures: the CLI on embedded defaults, and an endpoint that stalls until released."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.worker.conftest import jpeg

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def frame_jpeg() -> bytes:
    return jpeg()


class StallingEndpoint:
    """Accepts connections and reads the request, then answers nothing until :meth:`release`.

    Stands in for a RunPod endpoint whose job never finishes: the run sits inside the embedding step,
    holding its ``clip_inference`` slot, where a fault (a signal, a stopped database) can be injected.
    """

    def __init__(self) -> None:
        self.hit = threading.Event()
        self._release = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            self.hit.set()
            self._release.wait()
            body = b'{"error": "stalled endpoint released"}'
            conn.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self.release()
        self._sock.close()


@pytest.fixture
def stalling_endpoint() -> Iterator[StallingEndpoint]:
    endpoint = StallingEndpoint()
    yield endpoint
    endpoint.close()
