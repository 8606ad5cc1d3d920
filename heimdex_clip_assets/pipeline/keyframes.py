"""Keyframes: a video's existing scenes adopted, or its file -> scenes -> best frames -> thumbnails, rows."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from heimdex_clip_contract.errors import InvalidVideoError, NotFoundError

from ..adapters.db import SceneRecord, VectorStore, VideoRecord
from ..adapters.storage import Storage
from ..domain.scenes import (
    Keyframe,
    contact_sheet,
    detect_scenes_and_keyframes,
    make_thumbnail,
    probe_video,
)
from .embed import KeyframeEmbedder, stored_embedding

UPLOAD_THREADS = 8


def thumbnail_path(owner_id: str, video_id: str, index: int) -> str:
    """Where the seed system keeps a scene's thumbnail (bucket ``videos``)."""
    return f"{owner_id}/{video_id}/thumbnails/scene_{index}.jpg"


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
    contact_sheet_jpeg: bytes | None  # None for adopted scenes: no frame was decoded
    adopted: bool = False  # True: the scenes existed and were taken as they are
    without_thumbnail: int = 0  # scenes that cannot be embedded
    embedded: int = 0  # scenes embedded while detecting (``embedder``)
    timings_s: dict[str, float] = field(default_factory=dict)


def extract_keyframes(
    video_id: str,
    *,
    store: VectorStore,
    storage: Storage,
    params: SceneParams = SceneParams(),
    embedder: Callable[[], KeyframeEmbedder] | None = None,
) -> KeyframeReport:
    """The video's scenes: adopted as they are when it has any, else detected and written.

    Scenes that exist (made by the seed system's worker, or by an earlier run) are never re-detected or
    replaced: the report lists them, with how many have no thumbnail (those cannot be embedded). A video
    without scenes is downloaded and decoded: scenes -> best frame each -> thumbnails at
    ``{owner_id}/{video_id}/thumbnails/scene_{index}.jpg`` -> rows in the seed's layout. A video we
    cannot decode is marked failed.

    With ``embedder`` (a factory, called only when scenes are detected), each thumbnail is also embedded
    as its scene ends, while decoding goes on, and the vectors are written once the rows exist: the
    embedding step then finds those scenes current. Scenes it could not embed are left to that step.
    """
    video = store.get_video(video_id)
    if video is None:
        raise NotFoundError(f"Unknown video id {video_id}; register it first with `heimdex-clip add-video`")
    existing = store.scenes(video_id)
    if existing:
        if video.state in (None, "registered", "failed"):
            store.set_video_state(video_id, "scenes_ready")
        return KeyframeReport(
            video=store.get_video(video_id) or video,
            scenes=existing,
            contact_sheet_jpeg=None,
            adopted=True,
            without_thumbnail=sum(s.thumbnail_url is None for s in existing),
        )

    streaming = embedder() if embedder is not None else None
    try:
        return _detect_and_write(video, store=store, storage=storage, params=params, streaming=streaming)
    except BaseException:
        if streaming is not None:
            streaming.cancel()  # its thread would otherwise wait for keyframes that never come
        raise


def _detect_and_write(
    video: VideoRecord,
    *,
    store: VectorStore,
    storage: Storage,
    params: SceneParams,
    streaming: KeyframeEmbedder | None,
) -> KeyframeReport:
    video_id = video.id
    timings: dict[str, float] = {}
    thumbs: list[bytes] = []

    def on_keyframe(keyframe: Keyframe) -> None:
        t0 = time.perf_counter()
        thumbs.append(make_thumbnail(keyframe.image, max_side=params.thumbnail_max_side))
        timings["thumbnails"] += time.perf_counter() - t0
        if streaming is not None:
            streaming.submit(keyframe.index, thumbs[-1])

    with tempfile.TemporaryDirectory(prefix="heimdex-") as tmp:
        t0 = time.perf_counter()
        # A name of our own: the stored one is the user's (any characters); only its suffix matters.
        local = Path(tmp) / f"source{Path(video.storage_path).suffix.lower()}"
        storage.download_to(video.storage_path, local)  # streamed: memory stays flat for any size
        timings["download"] = time.perf_counter() - t0
        if streaming is not None:
            t0 = time.perf_counter()
            streaming.wait_ready()
            timings["model_wait"] = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            timings["thumbnails"] = 0.0
            info = probe_video(local)
            # One decode pass both finds the cuts and chooses each scene's keyframe; each keyframe's
            # thumbnail is made (and handed to the embedder) as soon as its scene ends.
            scenes, keyframes = detect_scenes_and_keyframes(
                local,
                detector=params.detector,
                threshold=params.threshold,
                min_scene_len_s=params.min_scene_len_s,
                max_side=params.thumbnail_max_side,
                on_keyframe=on_keyframe,
            )
            timings["detect"] = time.perf_counter() - t0 - timings["thumbnails"]
        except InvalidVideoError as exc:
            store.set_video_state(video_id, "failed", exc.message)
            raise

    t0 = time.perf_counter()
    paths = [thumbnail_path(video.owner_id, video_id, k.index) for k in keyframes]
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
            thumbnail_url=storage.public_url(path),
            keyframe_s=k.time_s,
            thumbnail_sha256=hashlib.sha256(jpeg).hexdigest(),
        )
        for scene, k, path, jpeg in zip(scenes, keyframes, paths, thumbs, strict=True)
    ]
    store.insert_scenes(video_id, records)
    store.update_video_info(
        video_id, duration_s=info.duration_s, frame_rate=info.fps, width=info.width, height=info.height
    )
    store.set_video_state(video_id, "scenes_ready")
    timings["db"] = time.perf_counter() - t0
    rows = store.scenes(video_id)

    embedded = 0
    if streaming is not None:
        # What is left of the embedding once detection is over: the last batch, and the writes.
        t0 = time.perf_counter()
        vectors, now = streaming.results(), time.time()
        written = [
            stored_embedding(row.id, vectors[row.index], now)
            for row in rows
            if row.index in vectors and row.id is not None
        ]
        store.write_scene_embeddings(written)
        embedded = len(written)
        timings["embed"] = time.perf_counter() - t0
    return KeyframeReport(
        video=store.get_video(video_id) or video,
        scenes=rows,
        embedded=embedded,
        contact_sheet_jpeg=contact_sheet(thumbs),
        # Milliseconds are what a person reads (the UI shows these as they are); more digits are noise.
        timings_s={stage: round(seconds, 3) for stage, seconds in timings.items()},
    )
