"""Registering videos: a local file is uploaded to storage and recorded in the videos table.

The layout is the seed system's: bucket ``videos``, the file at ``{owner_id}/{video_id}/source{ext}``
(a key made from ids, never from the user's file name, whose characters storage may refuse; the name is
kept in ``videos.filename``), status ``PENDING`` until the project's own progress moves it.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from heimdex_clip_contract.errors import ClipError, InvalidVideoError, NotFoundError

from ..adapters.db import VectorStore, VideoRecord
from ..adapters.storage import Storage
from ..domain.scenes import probe_video

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
# A fixed namespace makes a video's id a function of its owner and bytes: registering the same file
# twice (the sensor on two ticks, or `add-video` and the inbox) yields one video, not two, while two
# owners uploading one file each get their own.
VIDEO_ID_NAMESPACE = uuid.UUID("6f1c1a52-3c55-4f0e-9a57-1f3a4f6c8e21")


def video_storage_path(owner_id: str, video_id: str, filename: str) -> str:
    """The key derives from the ids alone (plus a known extension), in the seed system's folder of the
    video: a user's file name can hold anything storage refuses (a backslash, ``%ff``, a newline, 230
    characters); it is kept in ``videos.filename`` instead."""
    suffix = Path(filename).suffix.lower()
    return f"{owner_id}/{video_id}/source{suffix if suffix in VIDEO_EXTENSIONS else ''}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def register_video(path: Path, *, store: VectorStore, storage: Storage, owner_id: str) -> str:
    """Upload a local video file for ``owner_id`` and record it; returns its id (stable for the same
    owner and bytes)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"No such file: {path}; check the path")
    if path.stat().st_size == 0:
        raise InvalidVideoError(f"'{path.name}' is empty; pass a video file")
    info = probe_video(path)  # refuse non-videos before anything is stored
    video_id = str(uuid.uuid5(VIDEO_ID_NAMESPACE, f"{owner_id}/{file_sha256(path)}"))
    if store.get_video(video_id) is not None:
        return video_id
    store.ensure_owner(owner_id)
    storage_path = video_storage_path(owner_id, video_id, path.name)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    storage.upload(storage_path, path, content_type=content_type, upsert=True)  # streamed from disk
    store.add_video(
        VideoRecord(
            id=video_id,
            owner_id=owner_id,
            storage_path=storage_path,
            filename=path.name,
            duration_s=info.duration_s,
            frame_rate=info.fps,
            width=info.width,
            height=info.height,
        )
    )
    return video_id


def settled_inbox_files(inbox: Path, settle_s: float) -> list[Path]:
    """The inbox's video files that are ready to register: a directory listing and a stat each, no
    reading, so the sensor can ask every tick. A file modified in the last ``settle_s`` seconds, or
    hidden (``.name``, as rsync and many uploaders write), may still be being copied: it waits."""
    inbox.mkdir(parents=True, exist_ok=True)
    now = time.time()
    return [
        path
        for path in sorted(inbox.iterdir())
        if path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() in VIDEO_EXTENSIONS
        and now - path.stat().st_mtime >= settle_s
    ]


@dataclass
class InboxScan:
    """One pass over the inbox: the ids registered, and each file moved aside with why."""

    registered: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)


def scan_inbox(
    inbox: Path, *, store: VectorStore, storage: Storage, owner_id: str, settle_s: float = 10.0
) -> InboxScan:
    """Register every video file dropped in ``inbox`` (for ``owner_id``) and move it to
    ``inbox/registered``.

    Every file that fails on its own (not a video, refused by storage, unreadable) moves to
    ``inbox/rejected`` with a ``.error.txt`` giving the reason, and the other files go on in the same
    pass: one bad file never blocks the inbox or gets retried on every tick. Files still being copied
    wait (:func:`settled_inbox_files`).
    """
    scan = InboxScan()
    for path in settled_inbox_files(inbox, settle_s):
        try:
            scan.registered.append(register_video(path, store=store, storage=storage, owner_id=owner_id))
            dest = inbox / "registered"
        except (ClipError, OSError) as exc:
            if isinstance(exc, ClipError) and exc.code == "database_error":
                raise  # the database, not this file: the whole pass waits for it
            reason = exc.message if isinstance(exc, ClipError) else f"cannot read the file ({exc.strerror})"
            scan.rejected.append((path.name, reason))
            dest = inbox / "rejected"
            dest.mkdir(exist_ok=True)
            # The reason beside the file; the name is cut so that it still fits a file system's 255 bytes.
            (dest / f"{path.name[:200]}.error.txt").write_text(reason + "\n")
        dest.mkdir(exist_ok=True)
        path.replace(dest / path.name)
    return scan
