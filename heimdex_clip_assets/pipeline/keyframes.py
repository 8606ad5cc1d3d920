"""Keyframes: a video's existing scenes adopted, or its file -> scenes -> best frames -> thumbnails, rows."""

from __future__ import annotations

import hashlib
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from heimdex_clip_contract.errors import InvalidVideoError, NotFoundError

from ..adapters.db import SceneRecord, VectorStore, VideoRecord
from ..adapters.storage import Storage
from ..domain.scenes import contact_sheet, detect_scenes_and_keyframes, make_thumbnail, probe_video

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
    timings_s: dict[str, float] = field(default_factory=dict)


def extract_keyframes(
    video_id: str, *, store: VectorStore, storage: Storage, params: SceneParams = SceneParams()
) -> KeyframeReport:
    """The video's scenes: adopted as they are when it has any, else detected and written.

    Scenes that exist (made by the seed system's worker, or by an earlier run) are never re-detected or
    replaced: the report lists them, with how many have no thumbnail (those cannot be embedded). A video
    without scenes is downloaded and decoded: scenes -> best frame each -> thumbnails at
    ``{owner_id}/{video_id}/thumbnails/scene_{index}.jpg`` -> rows in the seed's layout. A video we
    cannot decode is marked failed.
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

    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="heimdex-") as tmp:
        t0 = time.perf_counter()
        # A name of our own: the stored one is the user's (any characters); only its suffix matters.
        local = Path(tmp) / f"source{Path(video.storage_path).suffix.lower()}"
        storage.download_to(video.storage_path, local)  # streamed: memory stays flat for any size
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
            store.set_video_state(video_id, "failed", exc.message)
            raise
    t0 = time.perf_counter()
    thumbs = [make_thumbnail(k.image, max_side=params.thumbnail_max_side) for k in keyframes]
    timings["thumbnails"] = time.perf_counter() - t0

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
    return KeyframeReport(
        video=store.get_video(video_id) or video,
        scenes=store.scenes(video_id),
        contact_sheet_jpeg=contact_sheet(thumbs),
        # Milliseconds are what a person reads (the UI shows these as they are); more digits are noise.
        timings_s={stage: round(seconds, 3) for stage, seconds in timings.items()},
    )
