"""A loopback HTTP server that answers each path with what was registered for it: the images a worker
fetches in tests and benches, and the misbehaving answers (slow, oversized, wrong type) its tests need."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    body: bytes = b""
    content_type: str | None = "image/jpeg"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes
    delay_s: float = 0.0


class ImageServer:
    """A threaded HTTP/1.0 server on 127.0.0.1 answering each path with its registered Route."""

    def __init__(self) -> None:
        routes: dict[str, Route] = {}
        self.routes = routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404)
                    return
                time.sleep(route.delay_s)
                self.send_response(route.status)
                if route.content_type:
                    self.send_header("Content-Type", route.content_type)
                if route.send_length:
                    self.send_header("Content-Length", str(len(route.body)))
                for key, value in route.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                # The client may stop reading at its size cap: a broken pipe is expected then.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(route.body)

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def add(self, path: str, route: Route | bytes) -> str:
        """Serve ``route`` (or image bytes as image/jpeg) at ``path``; returns its URL."""
        self.routes[path] = route if isinstance(route, Route) else Route(body=route)
        return self.url(path)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
