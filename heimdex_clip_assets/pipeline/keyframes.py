"""Keyframes: a video in storage -> scenes -> the best frame of each as a thumbnail -> scene rows."""

from __future__ import annotations

import dataclasses
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


def thumbnail_path(video_id: str, index: int) -> str:
    return f"thumbnails/{video_id}/{index}.jpg"


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
        # Milliseconds are what a person reads (the UI shows these as they are); more digits are noise.
        timings_s={stage: round(seconds, 3) for stage, seconds in timings.items()},
    )
