"""Scene bench: detection + keyframe choice (one decode pass) speed (x realtime), thumbnail cost per scene.

    .venv/bin/python bench/scenes.py [--seconds 60] [--size 1280x720]

Runs on a generated sample video with known cuts, so it also reports how many cuts were found.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from heimdex_clip_assets.devservices.sample_video import generate_sample_video
from heimdex_clip_assets.domain.scenes import detect_scenes_and_keyframes, make_thumbnail

SCENE_SECONDS = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--size", default="1280x720")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    scenes = max(1, round(args.seconds / SCENE_SECONDS))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        video = generate_sample_video(Path(tmp) / "bench.mp4", scenes=scenes, size=(width, height))
        encode_s = time.perf_counter() - t0
        duration_s = scenes * SCENE_SECONDS

        t0 = time.perf_counter()
        found, keyframes = detect_scenes_and_keyframes(video)
        detect_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for keyframe in keyframes:
            make_thumbnail(keyframe.image)
        thumbs_s = time.perf_counter() - t0

    print(f"video: {duration_s:.0f} s of {width}x{height}, generated in {encode_s:.1f} s")
    print(f"scenes: {len(found)} found, {scenes} made")
    print(f"detect + keyframes: {detect_s:.2f} s = {duration_s / detect_s:.1f}x realtime")
    print(f"thumbnails: {1000 * thumbs_s / len(found):.1f} ms/scene")


if __name__ == "__main__":
    main()
