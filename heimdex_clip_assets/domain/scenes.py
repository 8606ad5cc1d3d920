"""Scene detection and keyframe choice: a video file in, one scored frame per scene out.

Everything here is a pure function of the file's bytes: the same video gives the same scenes, the same
keyframes and byte-identical thumbnails, which the embedding cache and idempotent reruns rely on.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode, ThresholdDetector
from scenedetect.detector import FlashFilter
from scenedetect.scene_manager import compute_downscale_factor

from heimdex_clip_contract.errors import InvalidVideoError

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
# Keyframe candidates are decoded frames held by reference (copying or scaling each one would cost as
# much as detection itself) until their scene ends. Per open scene the pool keeps between N and 2N,
# evenly spread, so memory stays bounded however long a scene runs: N is 16 (a 25/50/75 % point is at
# most 1/32 of the scene from a candidate, one analysis frame in short scenes), fewer for frames so
# large that 2N of them would pass _POOL_BYTES, but never under 4.
_POOL_SIZE = 16
_POOL_BYTES = 64 << 20


@dataclass(frozen=True)
class _Scored:
    frame_no: int
    frame: av.VideoFrame
    sharpness: float  # variance of the Laplacian: high for crisp edges, low for blur and darkness
    brightness: float  # mean grey level, 0-1
    usable: bool

    @property
    def score(self) -> tuple[float, float]:
        """(sharpness, brightness), as a Keyframe reports them."""
        return self.sharpness, self.brightness


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


def detect_scenes_and_keyframes(
    path: str | Path,
    *,
    detector: Detector = "content",
    threshold: float | None = None,
    min_scene_len_s: float = 0.5,
    candidates: int = 3,
    max_side: int | None = 480,
    on_keyframe: Callable[[Keyframe], None] | None = None,
) -> tuple[list[Scene], list[Keyframe]]:
    """Split a video into scenes and choose each scene's sharpest usable frame, in ONE decode pass.

    A video without cuts is one scene. ``threshold`` is the chosen detector's own (content: 27,
    adaptive: 3, threshold: 12 by default). The keyframe is the best of ``candidates`` frames near
    evenly spaced points of the scene (25/50/75 % for three); ``max_side`` bounds its size (None: full).
    ``on_keyframe`` is called with each keyframe, in order, as soon as its scene ends (the next cut),
    while the rest of the video is still being decoded: the same keyframes the result lists.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    scene_detector = _make_detector(detector, threshold, min_scene_len_s)
    keyframes: list[Keyframe] = []
    with _open_video(path) as (container, stream):
        # Frame threads: decoding is most of the cost and otherwise runs on one core.
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        width, height = stream.codec_context.width, stream.codec_context.height
        downscale = max(1, round(compute_downscale_factor(width)))
        # Even, as I420 needs; SceneManager would round to the nearest pixel, a difference of one.
        small = max(2, round(width / downscale / 2) * 2), max(2, round(height / downscale / 2) * 2)
        step = max(1, round(rate / _ANALYSIS_FPS))
        frame_bytes = width * height * 3 // 2  # yuv420p, what nearly every video decodes to
        pool_size = max(4, min(_POOL_SIZE, _POOL_BYTES // (2 * frame_bytes)))
        pool = _CandidatePool(candidates, pool_size, step)

        def take_keyframes() -> None:
            """The keyframes of the scenes closed since the last call, made and handed on now."""
            for _, _, best in pool.picks[len(keyframes) :]:
                keyframe = Keyframe(
                    len(keyframes),
                    FrameTimecode(best.frame_no, rate).seconds,
                    _to_image(best.frame, max_side),
                    *best.score,
                )
                keyframes.append(keyframe)
                if on_keyframe is not None:
                    on_keyframe(keyframe)

        last = -1
        for last, frame in enumerate(_decode(container, stream)):
            if last % step:
                continue
            pool.add(last, frame)
            image = _small_bgr(frame, small)
            for cut in scene_detector.process_frame(FrameTimecode(last, rate), image):
                pool.cut(cut.frame_num)
                take_keyframes()
        if last < 0:
            raise _undecodable(path, "no frame decodes")
        # Some detectors (threshold: a fade-out at the end) only report cuts once the video is over.
        for cut in scene_detector.post_process(FrameTimecode(last, rate)):
            pool.cut(cut.frame_num)
        picks = pool.close(last + 1)
        take_keyframes()
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        else:
            duration_s = (container.duration or 0) / av.time_base
    scenes = [
        Scene(i, FrameTimecode(start, rate).seconds, FrameTimecode(end, rate).seconds)
        for i, (start, end, _) in enumerate(picks)
    ]
    # The last frame can end a little before the container's duration; the scenes must tile the video.
    scenes[-1] = Scene(scenes[-1].index, scenes[-1].start_s, max(scenes[-1].end_s, duration_s))
    return scenes, keyframes


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
    """A JPEG grid of keyframes, each labelled with its position (the scene index), for a quick look.

    ``columns`` is the most per row; the grid is sized to the images (3 scenes: one row of 3; 7: two rows
    of 4), so at most one row has an empty cell and never more empty cells than rows.
    """
    rows = max(1, math.ceil(len(images) / columns))
    columns = max(1, math.ceil(len(images) / rows))
    tile_height = tile_width * 9 // 16
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


def _score(frame_no: int, frame: av.VideoFrame) -> _Scored:
    height = max(1, round(frame.height * _SCORE_WIDTH / frame.width))
    grey = frame.reformat(width=_SCORE_WIDTH, height=height, format="gray").to_ndarray()
    brightness = float(grey.mean()) / 255
    usable = _MIN_BRIGHTNESS <= brightness <= _MAX_BRIGHTNESS and float(grey.std()) / 255 >= _MIN_CONTRAST
    return _Scored(frame_no, frame, float(cv2.Laplacian(grey, cv2.CV_64F).var()), brightness, usable)


def _small_bgr(frame: av.VideoFrame, size: tuple[int, int]) -> np.ndarray:
    """The frame at ``size`` in BGR, as PySceneDetect's detectors take it.

    Resizing the YUV planes and converting only the small image is ~4x cheaper than swscale or
    SceneManager's own path (BGR at full size, then cv2.resize), and INTER_LINEAR is what SceneManager
    resizes with, so the detector sees the same kind of image.
    """
    if frame.format.name != "yuv420p":
        return frame.reformat(*size, format="bgr24").to_ndarray()
    width, height = size
    y, u, v = (np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width] for p in frame.planes)
    i420 = np.concatenate(
        [
            cv2.resize(y, size, interpolation=cv2.INTER_LINEAR).ravel(),
            cv2.resize(u, (width // 2, height // 2), interpolation=cv2.INTER_LINEAR).ravel(),
            cv2.resize(v, (width // 2, height // 2), interpolation=cv2.INTER_LINEAR).ravel(),
        ]
    )
    return cv2.cvtColor(i420.reshape(height * 3 // 2, width), cv2.COLOR_YUV2BGR_I420)


def _to_image(frame: av.VideoFrame, max_side: int | None) -> Image.Image:
    scale = 1.0 if max_side is None else min(1.0, max_side / max(frame.width, frame.height))
    if scale == 1.0:
        return frame.to_image()
    width, height = (max(2, round(frame.width * scale)), max(2, round(frame.height * scale)))
    return frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_image()


class _CandidatePool:
    """Keyframe candidates of the scene still open, gathered during the detection pass.

    A scene's 25/50/75 % points are only known at its end (the next cut), so frames are kept until
    then; only the few nearest those points are ever scored and converted.
    """

    def __init__(self, candidates: int, size: int, spacing: int) -> None:
        self._fractions = [(k + 1) / (candidates + 1) for k in range(candidates)]
        self._size = size
        self._base_spacing = self._spacing = spacing
        self._start = 0
        self._frames: list[tuple[int, av.VideoFrame]] = []
        self._picks: list[tuple[int, int, _Scored]] = []

    def add(self, frame_no: int, frame: av.VideoFrame) -> None:
        if self._frames and frame_no - self._frames[-1][0] < self._spacing:
            return
        self._frames.append((frame_no, frame))
        if len(self._frames) > 2 * self._size:
            # Every other frame, sampled half as often from now on: the rest stay evenly spread.
            del self._frames[1::2]
            self._spacing *= 2

    def cut(self, frame_no: int) -> None:
        """Close the open scene at ``frame_no`` (the first frame of the next) and pick its keyframe."""
        if frame_no <= self._start:
            return
        inside = [f for f in self._frames if f[0] < frame_no]
        # A cut is only reported once its frame was seen, so the frames after it belong to the next scene.
        self._frames = [f for f in self._frames if f[0] >= frame_no]
        self._picks.append((self._start, frame_no, self._pick(frame_no, inside or self._frames[:1])))
        self._start, self._spacing = frame_no, self._base_spacing

    @property
    def picks(self) -> list[tuple[int, int, _Scored]]:
        """(start, end, keyframe) of each scene closed so far."""
        return self._picks

    def close(self, end: int) -> list[tuple[int, int, _Scored]]:
        """Close the last scene at ``end`` (one past the last frame): (start, end, keyframe) per scene."""
        self.cut(end)
        return self._picks

    def _pick(self, end: int, frames: list[tuple[int, av.VideoFrame]]) -> _Scored:
        targets = [self._start + (end - self._start) * q for q in self._fractions]
        # Nearest frame to each point (ties: the earlier); short scenes can give the same frame twice.
        nearest = sorted({min(frames, key=lambda f: abs(f[0] - t)) for t in targets}, key=lambda f: f[0])
        best: _Scored | None = None
        for frame_no, frame in nearest:
            scored = _score(frame_no, frame)
            # Usable beats unusable, then sharper wins; strict ">" keeps the earliest of equals, so the
            # choice is stable.
            if best is None or (scored.usable, scored.sharpness) > (best.usable, best.sharpness):
                best = scored
        assert best is not None  # frames is never empty: every scene holds at least one analysed frame
        return best
