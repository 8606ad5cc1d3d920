"""Scene detection and keyframe choice: a video file in, one scored frame per scene out.

Everything here is a pure function of the file's bytes: the same video gives the same scenes, the same
keyframes and byte-identical thumbnails, which the embedding cache and idempotent reruns rely on.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import cv2
from PIL import Image, ImageDraw, ImageFont
from scenedetect import AdaptiveDetector, ContentDetector, SceneManager, ThresholdDetector, open_video
from scenedetect.detector import FlashFilter
from scenedetect.scene_manager import compute_downscale_factor

from heimdex_clip_assets.lib.errors import InvalidVideoError

Detector = Literal["content", "adaptive", "threshold"]

# Detection compares frames about this often. Decoding is the cost we cannot avoid, but skipping the
# colour conversion and comparison of the frames in between makes 720p detection ~2x faster, and a cut
# is still placed within one skipped frame (40 ms at 25 fps).
_ANALYSIS_FPS = 12.5
# Keyframe scoring runs on a frame this wide, so sharpness means the same at any resolution and costs
# little (swscale converts straight from YUV to grey).
_SCORE_WIDTH = 320
# A candidate is unusable when it is mostly black or white (fades, flashes) or has no detail at all
# (title cards, lens cap): those make poor thumbnails and poor CLIP inputs.
_MIN_BRIGHTNESS = 0.08
_MAX_BRIGHTNESS = 0.92
_MIN_CONTRAST = 0.03
# Between candidates further apart than this, seek instead of decoding through. A seek restarts at
# the previous keyframe (typically 1-10 s back), so for shorter gaps decoding on is never slower.
_SEEK_GAP_S = 10.0


@dataclass(frozen=True)
class _Scored:
    frame: av.VideoFrame
    sharpness: float  # variance of the Laplacian: high for crisp edges, low for blur and darkness
    brightness: float  # mean grey level, 0-1
    usable: bool


@dataclass(frozen=True)
class VideoInfo:
    duration_s: float
    fps: float
    width: int
    height: int
    frame_count: int


@dataclass(frozen=True)
class Scene:
    index: int
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Keyframe:
    index: int
    time_s: float
    image: Image.Image
    sharpness: float
    brightness: float


def probe_video(path: str | Path) -> VideoInfo:
    """Read a video's duration, frame rate and size, and check that its first frame decodes."""
    with _open_video(path) as (container, stream):
        if next(container.decode(stream), None) is None:
            raise _undecodable(path, "no frame decodes")
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        else:
            duration_s = (container.duration or 0) / av.time_base
        # Some containers do not record a frame count; the duration gives a close estimate.
        frame_count = stream.frames or round(duration_s * fps)
        size = stream.codec_context.width, stream.codec_context.height
        return VideoInfo(duration_s, fps, *size, frame_count)


def detect_scenes(
    path: str | Path,
    *,
    detector: Detector = "content",
    threshold: float | None = None,
    min_scene_len_s: float = 0.5,
    downscale: int | None = None,
    frame_skip: int | None = None,
) -> list[Scene]:
    """Split a video into scenes; a video without cuts is one scene.

    ``threshold`` is the chosen detector's own (content: 27, adaptive: 3, threshold: 12 by default).
    ``downscale`` and ``frame_skip`` default to what keeps 720p well above 30x realtime on two cores.
    """
    info = probe_video(path)
    manager = SceneManager()
    manager.auto_downscale = False
    manager.downscale = downscale or max(1, round(compute_downscale_factor(info.width)))
    manager.add_detector(_make_detector(detector, threshold, min_scene_len_s))
    if frame_skip is None:
        frame_skip = max(0, round(info.fps / _ANALYSIS_FPS) - 1)
    # OpenCV over PySceneDetect's PyAV backend: measured ~1.8x faster here with frame skipping,
    # because it skips frames with grab() and never converts them.
    manager.detect_scenes(open_video(str(path), backend="opencv"), frame_skip=frame_skip)
    spans = manager.get_scene_list(start_in_scene=True) or [(None, None)]
    scenes = [
        Scene(i, start.seconds if start is not None else 0.0, end.seconds if end is not None else 0.0)
        for i, (start, end) in enumerate(spans)
    ]
    # Skipped frames can leave the last scene a frame or two short; the scenes must tile the video.
    return [*scenes[:-1], Scene(scenes[-1].index, scenes[-1].start_s, max(scenes[-1].end_s, info.duration_s))]


def pick_keyframes(
    path: str | Path, scenes: Sequence[Scene], *, candidates: int = 3, max_side: int | None = None
) -> list[Keyframe]:
    """Choose the sharpest usable frame among ``candidates`` evenly spaced through each scene.

    ``max_side`` scales the kept image while it is converted from YUV, which is much cheaper than
    converting at full size and resizing later, and bounds memory on long videos.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    requests = sorted(
        (scene.start_s + scene.duration_s * (k + 1) / (candidates + 1), pos)
        for pos, scene in enumerate(scenes)
        for k in range(candidates)
    )
    left = [candidates] * len(scenes)
    best: dict[int, _Scored] = {}
    keyframes: list[Keyframe] = [None] * len(scenes)  # type: ignore[list-item]
    for (_, pos), frame in zip(requests, _frames_at(path, [t for t, _ in requests]), strict=True):
        scored = _score(frame)
        # Usable beats unusable, then sharper wins; strict ">" keeps the earliest of equals, so the
        # choice is stable.
        if pos not in best or (scored.usable, scored.sharpness) > (best[pos].usable, best[pos].sharpness):
            best[pos] = scored
        left[pos] -= 1
        if not left[pos]:
            # Convert the winner now and drop the rest, so memory holds one scene's candidates.
            chosen = best.pop(pos)
            keyframes[pos] = Keyframe(
                scenes[pos].index,
                float(chosen.frame.time),
                _to_image(chosen.frame, max_side),
                chosen.sharpness,
                chosen.brightness,
            )
    return keyframes


def make_thumbnail(image: Image.Image, *, max_side: int = 480, quality: int = 85) -> bytes:
    """A JPEG no larger than ``max_side``: enough for CLIP (224 px) and the UI, quick to decode."""
    image = image.convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    # No metadata and no optimize pass: the bytes depend on the pixels alone.
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def contact_sheet(images: Sequence[Image.Image | bytes], *, columns: int = 6, tile_width: int = 160) -> bytes:
    """A JPEG grid of keyframes, each labelled with its position (the scene index), for a quick look."""
    tile_height = tile_width * 9 // 16
    rows = max(1, math.ceil(len(images) / columns))
    sheet = Image.new("RGB", (columns * tile_width, rows * tile_height), "black")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=max(10, tile_height // 6))
    for i, item in enumerate(images):
        image = Image.open(io.BytesIO(item)) if isinstance(item, bytes) else item
        if isinstance(item, bytes):
            # JPEG decoding can shrink by 2-8x while decoding; the tile is far smaller than the frame.
            image.draft("RGB", (tile_width, tile_height))
        tile = image.convert("RGB")
        tile.thumbnail((tile_width, tile_height), Image.Resampling.BILINEAR)
        x, y = (i % columns) * tile_width, (i // columns) * tile_height
        sheet.paste(tile, (x + (tile_width - tile.width) // 2, y + (tile_height - tile.height) // 2))
        draw.text((x + 4, y + 2), str(i), fill="white", font=font, stroke_width=2, stroke_fill="black")
    out = io.BytesIO()
    sheet.save(out, format="JPEG", quality=80)
    return out.getvalue()


def _undecodable(path: str | Path, reason: str) -> InvalidVideoError:
    return InvalidVideoError(f"'{Path(path).name}' is not a video we can decode ({reason}); check the file")


def _make_detector(
    kind: Detector, threshold: float | None, min_scene_len_s: float
) -> ContentDetector | AdaptiveDetector | ThresholdDetector:
    # PySceneDetect reads a float min_scene_len as seconds.
    if kind == "content":
        # SUPPRESS, not the default MERGE: a montage of shots shorter than the minimum still splits
        # every min_scene_len_s instead of collapsing into one long scene nobody can search.
        return ContentDetector(
            min_scene_len=min_scene_len_s,
            filter_mode=FlashFilter.Mode.SUPPRESS,
            **_kw("threshold", threshold),
        )
    if kind == "adaptive":
        return AdaptiveDetector(min_scene_len=min_scene_len_s, **_kw("adaptive_threshold", threshold))
    if kind == "threshold":
        return ThresholdDetector(min_scene_len=min_scene_len_s, **_kw("threshold", threshold))
    raise ValueError(f"detector must be 'content', 'adaptive' or 'threshold', got {kind!r}")


def _kw(name: str, value: float | None) -> dict[str, float]:
    """Pass a threshold only when given, so each detector keeps its own default."""
    return {} if value is None else {name: value}


def _frames_at(path: str | Path, times: list[float]) -> Iterator[av.VideoFrame]:
    """The frame shown at each of the sorted ``times``, in one forward pass that seeks over long gaps."""
    with _open_video(path) as (container, stream):
        stream.thread_type = "AUTO"
        half_frame = 0.5 / float(stream.average_rate or 25)
        i = 0
        last = None
        while i < len(times):
            container.seek(int(times[i] / stream.time_base), stream=stream, backward=True)
            seeked_for = i
            for frame in _decode(container, stream):
                last = frame
                while i < len(times) and times[i] <= frame.time + half_frame:
                    yield frame
                    i += 1
                # Break to seek only after progress since the last seek, or a GOP longer than the
                # gap would seek back to the same keyframe forever.
                if i == len(times) or (i != seeked_for and times[i] - frame.time > _SEEK_GAP_S):
                    break
            else:
                # Past the end (a scene end rounded up): the last frame is the closest one.
                if last is None:
                    raise _undecodable(path, "no frame decodes")
                yield from [last] * (len(times) - i)
                i = len(times)


@contextmanager
def _open_video(path: str | Path) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """The file's first video stream; any decoding failure inside becomes an InvalidVideoError."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise _undecodable(path, "it has no video stream")
            yield container, container.streams.video[0]
    # PyAV's missing-file error is an FFmpegError and an OSError; the OSError also covers unreadable.
    except (av.FFmpegError, OSError) as e:
        raise _undecodable(path, str(e)) from e


def _decode(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.VideoFrame]:
    # Frames without a timestamp cannot be placed in a scene.
    return (frame for frame in container.decode(stream) if frame.time is not None)


def _score(frame: av.VideoFrame) -> _Scored:
    height = max(1, round(frame.height * _SCORE_WIDTH / frame.width))
    grey = frame.reformat(width=_SCORE_WIDTH, height=height, format="gray").to_ndarray()
    brightness = float(grey.mean()) / 255
    usable = _MIN_BRIGHTNESS <= brightness <= _MAX_BRIGHTNESS and float(grey.std()) / 255 >= _MIN_CONTRAST
    return _Scored(frame, float(cv2.Laplacian(grey, cv2.CV_64F).var()), brightness, usable)


def _to_image(frame: av.VideoFrame, max_side: int | None) -> Image.Image:
    scale = 1.0 if max_side is None else min(1.0, max_side / max(frame.width, frame.height))
    if scale == 1.0:
        return frame.to_image()
    width, height = (max(2, round(frame.width * scale)), max(2, round(frame.height * scale)))
    return frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_image()
