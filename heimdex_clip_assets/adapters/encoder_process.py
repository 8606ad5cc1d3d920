"""The local CLIP encoder in a child process, for a command that cannot wait for the model to load.

Loading the model is mostly importing torch and open_clip: seconds of Python that holds the GIL. In the
command's own process it can only take turns with Dagster's start-up (or, later, slow scene detection
several-fold), so ``demo`` loads it here instead, on the core that start-up leaves idle. The child runs
the worker's own :class:`~runpod_worker.encoder.ClipEncoder`, so its vectors are the in-process ones;
JPEG bytes go in and vectors come back over a pipe (60 thumbnails are ~3 MB).

The child ends with its pipe: when the command exits, however it exits, the child reads end-of-file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection, Pipe
from typing import Any

import numpy as np

from heimdex_clip_contract.errors import ClipError, InternalError


class EncoderProcess:
    """The subset of ``ClipEncoder`` the local backend uses, answered by a child process; safe to
    share by threads (one request at a time, as the encoder itself runs one forward pass at a time)."""

    def __init__(self, model_name: str, pretrained: str, precision: str | None) -> None:
        ours, theirs = Pipe()
        self._conn = ours
        self._lock = threading.Lock()
        # Quiet unless debugging: the command says what matters itself (open_clip's random-weights
        # warning, among others, would come twice); errors come back over the pipe.
        quiet = None if os.environ.get("HEIMDEX_DEBUG") else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdout=quiet,
            stderr=quiet,
        )
        theirs.close()
        self._conn.send((model_name, pretrained, precision))
        self._info: dict[str, Any] | None = None
        self._failed: ClipError | None = None

    def _ready(self) -> dict[str, Any]:
        """The model's fields, once the child has loaded it; raises why it could not, every time."""
        with self._lock:
            if self._failed is not None:
                raise self._failed
            if self._info is None:
                try:
                    self._info = self._answer()
                except ClipError as exc:
                    self._failed = exc
                    raise
            return self._info

    def _answer(self) -> Any:
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            raise InternalError(
                f"The CLIP model's process ended (exit code {self._proc.poll()}); run again with "
                "HEIMDEX_DEBUG=1 to see why"
            ) from None
        if status == "error":
            raise value
        return value

    def _call(self, op: str, arg: Any) -> Any:
        self._ready()
        with self._lock:
            self._conn.send((op, arg))
            return self._answer()

    @property
    def model_name(self) -> str:
        return str(self._ready()["model_name"])

    @property
    def pretrained(self) -> str:
        return str(self._ready()["pretrained"])

    @property
    def model_version(self) -> str:
        return str(self._ready()["model_version"])

    @property
    def dim(self) -> int:
        return int(self._ready()["dim"])

    @property
    def device(self) -> str:
        return str(self._ready()["device"])

    def limit_threads(self, threads: int | None) -> None:
        self._call("threads", threads)

    def encode_bytes(self, images: Sequence[bytes]) -> list[np.ndarray | ClipError]:
        return list(self._call("encode", list(images)))


def _serve(conn: Connection) -> None:
    from runpod_worker.encoder import ClipEncoder

    model_name, pretrained, precision = conn.recv()
    try:
        encoder = ClipEncoder.load(model_name, pretrained, precision=precision)
    except ClipError as exc:
        conn.send(("error", exc))
        return
    fields = ("model_name", "pretrained", "model_version", "dim")
    conn.send(("ok", {**{f: getattr(encoder, f) for f in fields}, "device": str(encoder.device)}))
    while True:
        try:
            op, arg = conn.recv()
        except EOFError:  # the command is over
            return
        try:
            answer = encoder.encode_bytes(arg) if op == "encode" else encoder.limit_threads(arg)
        except ClipError as exc:
            conn.send(("error", exc))
        else:
            conn.send(("ok", answer))


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
