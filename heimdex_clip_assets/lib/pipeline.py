"""The ingestion stages as plain functions: what each Dagster asset (and the CLI) runs.

Each stage takes the objects it needs (vector store, storage, CLIP backend) and returns a small report
the caller turns into logs, Dagster metadata or a table. No Dagster import: the same code runs in an
asset, in ``heimdex-clip backfill`` and in tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import mimetypes
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .clip_backends import ClipBackend, EmbeddingResult, SceneImage, log_result
from .db import EmbeddingRow, SceneRecord, VectorStore, VideoRecord
from .errors import ClipError, InvalidVideoError, NotFoundError
from .scenes import contact_sheet, detect_scenes_and_keyframes, make_thumbnail, probe_video
from .storage import Storage

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
# A fixed namespace makes a video's id a function of its bytes: registering the same file twice (the
# sensor on two ticks, or `add-video` and the inbox) yields one video, not two.
VIDEO_ID_NAMESPACE = uuid.UUID("6f1c1a52-3c55-4f0e-9a57-1f3a4f6c8e21")
UPLOAD_THREADS = 8


def thumbnail_path(video_id: str, index: int) -> str:
    return f"thumbnails/{video_id}/{index}.jpg"


def video_storage_path(video_id: str, filename: str) -> str:
    return f"videos/{video_id}/{filename}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ register
def register_video(path: Path, *, store: VectorStore, storage: Storage) -> str:
    """Upload a local video file and record it; returns its id (stable for the same bytes)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"No such file: {path}; check the path")
    if path.stat().st_size == 0:
        raise InvalidVideoError(f"'{path.name}' is empty; pass a video file")
    info = probe_video(path)  # refuse non-videos before anything is stored
    video_id = str(uuid.uuid5(VIDEO_ID_NAMESPACE, file_sha256(path)))
    if store.get_video(video_id) is not None:
        return video_id
    storage_path = video_storage_path(video_id, path.name)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    storage.upload(storage_path, path.read_bytes(), content_type=content_type, upsert=True)
    store.upsert_video(
        VideoRecord(
            id=video_id,
            storage_path=storage_path,
            filename=path.name,
            duration_s=info.duration_s,
            fps=info.fps,
            width=info.width,
            height=info.height,
            status="registered",
        )
    )
    return video_id


def scan_inbox(inbox: Path, *, store: VectorStore, storage: Storage, settle_s: float = 10.0) -> list[str]:
    """Register every video file dropped in ``inbox`` and move it to ``inbox/registered``.

    Files that are not videos move to ``inbox/rejected`` with a ``.error.txt`` beside them, so one
    bad file never blocks the inbox or gets retried on every tick. A file modified in the last
    ``settle_s`` seconds, or hidden (``.name``, as rsync and many uploaders write), may still be being
    copied: it waits for a later tick rather than being registered truncated.
    """
    inbox.mkdir(parents=True, exist_ok=True)
    ids = []
    now = time.time()
    for path in sorted(inbox.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in VIDEO_EXTENSIONS:
            continue
        if now - path.stat().st_mtime < settle_s:
            continue
        try:
            ids.append(register_video(path, store=store, storage=storage))
            dest = inbox / "registered"
        except InvalidVideoError as exc:
            dest = inbox / "rejected"
            dest.mkdir(exist_ok=True)
            (dest / f"{path.name}.error.txt").write_text(exc.message + "\n")
        dest.mkdir(exist_ok=True)
        path.replace(dest / path.name)
    return ids


# ---------------------------------------------------------------------------------------- keyframes
@dataclass(frozen=True)
class SceneParams:
    detector: str = "content"
    threshold: float | None = None
    min_scene_len_s: float = 0.5
    thumbnail_max_side: int = 480


@dataclass
class KeyframeReport:
    video: VideoRecord
    scenes: list[SceneRecord]
    contact_sheet_jpeg: bytes
    timings_s: dict[str, float] = field(default_factory=dict)


def extract_keyframes(
    video_id: str, *, store: VectorStore, storage: Storage, params: SceneParams = SceneParams()
) -> KeyframeReport:
    """Video from storage -> scenes -> best frame each -> thumbnails in storage -> scene rows.

    A video we cannot decode marks the video failed and leaves its existing scenes untouched.
    """
    video = store.get_video(video_id)
    if video is None:
        raise NotFoundError(f"Unknown video id {video_id}; register it first with `heimdex-clip add-video`")
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="heimdex-") as tmp:
        t0 = time.perf_counter()
        local = Path(tmp) / (video.filename or "video.mp4")
        local.write_bytes(storage.download(video.storage_path))
        timings["download"] = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            info = probe_video(local)
            scenes, keyframes = detect_scenes_and_keyframes(
                local,
                detector=params.detector,
                threshold=params.threshold,
                min_scene_len_s=params.min_scene_len_s,
                max_side=params.thumbnail_max_side,
            )
            # One decode pass both finds the cuts and chooses each scene's keyframe.
            timings["detect"] = time.perf_counter() - t0
        except InvalidVideoError as exc:
            store.set_video_status(video_id, "failed", exc.message)
            raise
    t0 = time.perf_counter()
    thumbs = [make_thumbnail(k.image, max_side=params.thumbnail_max_side) for k in keyframes]
    timings["thumbnails"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    paths = [thumbnail_path(video_id, k.index) for k in keyframes]
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        # Real Supabase costs a round trip per object; overlapping them hides the latency.
        list(pool.map(lambda p, d: storage.upload(p, d, content_type="image/jpeg"), paths, thumbs))
    timings["upload"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    records = [
        SceneRecord(
            video_id=video_id,
            index=scene.index,
            start_s=scene.start_s,
            end_s=scene.end_s,
            keyframe_s=k.time_s,
            thumbnail_path=path,
            thumbnail_sha256=hashlib.sha256(jpeg).hexdigest(),
        )
        for scene, k, path, jpeg in zip(scenes, keyframes, paths, thumbs, strict=True)
    ]
    store.replace_scenes(video_id, records)
    store.upsert_video(
        dataclasses.replace(
            video,
            duration_s=info.duration_s,
            fps=info.fps,
            width=info.width,
            height=info.height,
            status="scenes_ready",
            error=None,
        )
    )
    timings["db"] = time.perf_counter() - t0
    return KeyframeReport(
        video=store.get_video(video_id) or video,
        scenes=store.scenes(video_id),
        contact_sheet_jpeg=contact_sheet(thumbs),
        timings_s=timings,
    )


# -------------------------------------------------------------------------------------- signed URLs
@dataclass(frozen=True)
class SignedUrl:
    path: str
    url: str
    expires_at: float

    def fresh(self, margin_s: float, now: float | None = None) -> bool:
        return self.expires_at - (time.time() if now is None else now) > margin_s


def sign_scene_urls(
    scenes: Sequence[SceneRecord], *, storage: Storage, expires_in: int
) -> dict[int, SignedUrl]:
    """One short-lived signed URL per thumbnail (one batch call to storage)."""
    paths = [s.thumbnail_path for s in scenes]
    issued = time.time()
    urls = storage.create_signed_urls(paths, expires_in)
    return {s.index: SignedUrl(s.thumbnail_path, urls[s.thumbnail_path], issued + expires_in) for s in scenes}


def refresh_signed_urls(
    urls: dict[int, SignedUrl], *, storage: Storage, expires_in: int, margin_s: float
) -> tuple[dict[int, SignedUrl], int]:
    """Re-sign the URLs that expire within ``margin_s``; returns the new map and how many were re-signed."""
    stale = {i: u for i, u in urls.items() if not u.fresh(margin_s)}
    if not stale:
        return urls, 0
    issued = time.time()
    fresh = storage.create_signed_urls([u.path for u in stale.values()], expires_in)
    out = dict(urls)
    for i, u in stale.items():
        out[i] = SignedUrl(u.path, fresh[u.path], issued + expires_in)
    return out, len(stale)


# --------------------------------------------------------------------------------------- embeddings
@dataclass
class EmbedReport:
    backend: str
    model_version: str
    embedded: int = 0
    cache_hits: int = 0
    resigned: int = 0
    failures: dict[int, ClipError] = field(default_factory=dict)
    inference_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.inference_ms, q)) if self.inference_ms else None


def embed_scenes(
    scenes: Sequence[SceneRecord],
    *,
    store: VectorStore,
    storage: Storage,
    backend: ClipBackend,
    signed_urls: dict[int, SignedUrl] | None = None,
    expires_in: int = 300,
    url_margin_s: float = 120.0,
    attempts: int = 2,
    use_cache: bool = True,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> EmbedReport:
    """Embed the given scenes of ONE video and store the vectors in one transaction.

    The sha256 cache (unless ``use_cache`` is off) answers scenes whose thumbnail was embedded before by
    the same model version. A scene whose embedding fails with a retryable error gets another attempt
    (with a fresh URL); what still fails is in ``report.failures`` and stays without an embedding, so a
    rerun does exactly those. Successful vectors are written even when others fail, each with an
    ``embedded_at`` in its metadata (what a resumed forced backfill reads).
    """
    logger = logger or log
    started = time.perf_counter()
    report = EmbedReport(backend=backend.name, model_version=backend.model_version)
    if not scenes:
        return report
    video_ids = {s.video_id for s in scenes}
    if len(video_ids) != 1:
        raise ValueError("embed_scenes works on the scenes of one video at a time")
    (video_id,) = video_ids

    rows: list[EmbeddingRow] = []
    cached = (
        store.cached_embeddings([s.thumbnail_sha256 for s in scenes], backend.model_version)
        if use_cache
        else {}
    )
    todo: list[SceneRecord] = []
    for scene in scenes:
        hit = cached.get(scene.thumbnail_sha256)
        if hit is None:
            todo.append(scene)
            continue
        vector, meta = hit
        rows.append(
            EmbeddingRow(scene.index, vector, {**meta, "cache_hit": True, "embedded_at": time.time()})
        )
        report.cache_hits += 1
    if on_progress and report.cache_hits:
        on_progress(report.cache_hits)

    # Only the scenes still to embed: re-signing the cache hits' URLs would be wasted calls.
    urls = {s.index: signed_urls[s.index] for s in todo if signed_urls and s.index in signed_urls}
    for attempt in range(1, attempts + 1):
        if not todo:
            break
        if backend.needs_urls:
            missing = [s for s in todo if s.index not in urls]
            if missing:
                urls.update(sign_scene_urls(missing, storage=storage, expires_in=expires_in))
            urls, resigned = refresh_signed_urls(
                urls, storage=storage, expires_in=expires_in, margin_s=url_margin_s
            )
            report.resigned += resigned
        images = [
            SceneImage(
                key=s.index,
                storage_path=s.thumbnail_path,
                url=urls[s.index].url if s.index in urls else None,
            )
            for s in todo
        ]
        for scene in todo:
            logger.info(
                f"Scene {scene.index}: Generating CLIP embedding from best frame (backend={backend.name})"
            )
        results = backend.embed(images)
        retry: list[SceneRecord] = []
        for scene, result in zip(todo, results, strict=True):
            logger.log(
                logging.INFO if isinstance(result, EmbeddingResult) else logging.WARNING,
                log_result(scene.index, backend.name, result),
            )
            if isinstance(result, EmbeddingResult):
                rows.append(
                    EmbeddingRow(scene.index, result.vector, {**result.metadata, "embedded_at": time.time()})
                )
                report.inference_ms.append(float(result.metadata.get("inference_time_ms", 0.0)))
                report.failures.pop(scene.index, None)
            else:
                report.failures[scene.index] = result
                if result.retryable and attempt < attempts:
                    retry.append(scene)
        if on_progress:
            on_progress(len(todo) - len(retry))
        # Force a fresh URL for retried scenes: an expired or consumed URL is a common cause.
        for scene in retry:
            urls.pop(scene.index, None)
        todo = retry

    store.write_embeddings(video_id, rows)
    report.embedded = len(rows)
    report.wall_s = time.perf_counter() - started
    return report


def embed_video(
    video_id: str,
    *,
    store: VectorStore,
    storage: Storage,
    backend: ClipBackend,
    force: bool = False,
    signed_urls: dict[int, SignedUrl] | None = None,
    expires_in: int = 300,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> EmbedReport:
    """Embed exactly the scenes of a video that lack a current embedding (all of them with ``force``)."""
    if store.get_video(video_id) is None:
        raise NotFoundError(f"Unknown video id {video_id}; check it with `heimdex-clip search` or add-video")
    scenes = store.scenes_needing_embeddings(backend.model_version, video_id=video_id, force=force)
    report = embed_scenes(
        scenes,
        store=store,
        storage=storage,
        backend=backend,
        signed_urls=signed_urls,
        expires_in=expires_in,
        logger=logger,
    )
    status = "embedded" if not report.failures else "embedding_incomplete"
    store.set_video_status(video_id, status, None if not report.failures else failure_summary(report))
    return report


def failure_summary(report: EmbedReport) -> str:
    return "; ".join(f"scene {i}: {err.code}: {err.message}" for i, err in sorted(report.failures.items()))
