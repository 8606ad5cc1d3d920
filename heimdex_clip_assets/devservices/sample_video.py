"""A synthetic video with known cuts, for tests, benchmarks and ``heimdex-clip demo``.

Each scene has its own colours and pattern (so cuts are unambiguous), a shape moving across it and a
drifting background (so no two frames are identical), and an opening the keyframe picker must avoid:
odd scenes fade in from near-black, even ones after the first start out of focus. Both openings change
slowly, so they never look like a cut. Output is a pure function of the arguments.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

# Share of each scene taken by its dark or blurred opening: long enough that the picker's first
# candidate (25 %) lands inside it, short enough that the middle of the scene is clean.
OPENING_FRACTION = 0.4
# The fade starts here, not at 0: a pure-black frame has no hue, and the hue jump as colour appears
# would read as a second cut.
_FADE_FLOOR = 0.06
_MAX_BLUR = 41


def cut_times(*, scenes: int = 6, scene_seconds: float = 2.0, fps: int = 25) -> list[float]:
    """Seconds at which scenes 1..n-1 start in a video made with the same arguments."""
    return [_scene_start_frame(i, scene_seconds, fps) / fps for i in range(1, scenes)]


def generate_sample_video(
    path: str | Path,
    *,
    scenes: int = 6,
    scene_seconds: float = 2.0,
    size: tuple[int, int] = (1280, 720),
    fps: int = 25,
    seed: int = 0,
) -> Path:
    """Write an H.264 MP4 of ``scenes`` distinct scenes; cuts are at :func:`cut_times`."""
    width, height = size
    if width % 2 or height % 2:
        raise ValueError(f"size must be even for yuv420p, got {width}x{height}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # A keyframe every second keeps seeks cheap; ultrafast keeps a 720p minute to seconds on 2 cores.
        stream.gop_size = fps
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "23"}
        stream.codec_context.time_base = Fraction(1, fps)
        frame_index = 0
        for scene in range(scenes):
            n_frames = _scene_start_frame(scene + 1, scene_seconds, fps) - _scene_start_frame(
                scene, scene_seconds, fps
            )
            for image in _scene_frames(scene, n_frames, width, height, rng):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = frame_index
                frame_index += 1
                container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _scene_start_frame(scene: int, scene_seconds: float, fps: int) -> int:
    return round(scene * scene_seconds * fps)


def _scene_frames(
    scene: int, n_frames: int, width: int, height: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    background = _background(width, height, rng)
    shape_colour = rng.integers(0, 256, 3, dtype=np.uint8)
    side = max(8, height // 5)
    for i in range(n_frames):
        progress = i / max(1, n_frames - 1)
        # Drift the pattern a few pixels a frame and sweep a square across: cheap, visible motion.
        image = np.roll(background, 3 * i, axis=1)
        x = int(progress * (width - side))
        y = (height - side) // 2
        image[y : y + side, x : x + side] = shape_colour
        opening = 1.0 - min(1.0, progress / OPENING_FRACTION)
        if opening > 0 and scene % 2 == 1:
            gain = _FADE_FLOOR + (1 - _FADE_FLOOR) * (1 - opening) ** 2
            image = cv2.convertScaleAbs(image, alpha=gain)
        elif opening > 0 and scene > 0:
            k = 1 + 2 * round(opening * (_MAX_BLUR - 1) / 2)
            image = cv2.blur(image, (k, k))
        yield image


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A two-colour gradient with a high-contrast pattern (stripes, checks or rings) over it."""
    start, end, ink = (rng.integers(0, 256, 3).astype(np.float32) for _ in range(3))
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    image = np.broadcast_to(start + (end - start) * ramp, (height, width, 3)).astype(np.uint8)
    ys, xs = np.ogrid[:height, :width]
    period = int(rng.integers(24, 64))
    kind = int(rng.integers(0, 3))
    if kind == 0:
        mask = ((xs + ys) // period) % 2 == 0
    elif kind == 1:
        mask = ((xs // period) + (ys // period)) % 2 == 0
    else:
        mask = (np.hypot(xs - width / 2, ys - height / 2).astype(np.int32) // period) % 2 == 0
    image = image.copy()
    image[mask] = (0.5 * image[mask] + 0.5 * ink).astype(np.uint8)
    return image
