"""Scene detection, keyframe choice and thumbnails on synthetic videos whose cuts we know."""

from __future__ import annotations

import hashlib
import io
import wave
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from heimdex_clip_assets.devservices.sample_video import OPENING_FRACTION
from heimdex_clip_assets.domain.scenes import (
    Scene,
    contact_sheet,
    detect_scenes_and_keyframes,
    make_thumbnail,
    probe_video,
)
from heimdex_clip_contract.errors import InvalidVideoError
from tests.fixtures.video import SAMPLE_CUTS, SAMPLE_VIDEO, MakeVideo

FRAME_S = 1 / SAMPLE_VIDEO["fps"]


def detect_scenes(video: Path, **kwargs: Any) -> list[Scene]:
    return detect_scenes_and_keyframes(video, **kwargs)[0]


def assert_tiles(scenes: list[Scene], duration_s: float) -> None:
    assert [s.index for s in scenes] == list(range(len(scenes)))
    assert scenes[0].start_s == 0.0
    assert scenes[-1].end_s == pytest.approx(duration_s, abs=FRAME_S)
    assert all(a.end_s == b.start_s for a, b in pairwise(scenes))


def test_probe_reads_duration_rate_and_size(sample_video: Path) -> None:
    info = probe_video(sample_video)
    assert (info.width, info.height, info.fps) == (640, 360, 25.0)
    assert info.duration_s == pytest.approx(6.0, abs=FRAME_S)
    assert info.frame_count == 150


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_cuts_are_found_near_ground_truth(sample_video: Path, detector: str) -> None:
    scenes = detect_scenes(sample_video, detector=detector)  # type: ignore[arg-type]
    assert_tiles(scenes, 6.0)
    # Frame skipping may place a cut one frame late.
    assert [s.start_s for s in scenes[1:]] == pytest.approx(SAMPLE_CUTS, abs=2 * FRAME_S)


def test_threshold_detector_still_tiles_the_video(sample_video: Path) -> None:
    assert_tiles(detect_scenes(sample_video, detector="threshold"), 6.0)


def test_unknown_detector_is_refused(sample_video: Path) -> None:
    with pytest.raises(ValueError, match="detector must be"):
        detect_scenes(sample_video, detector="magic")  # type: ignore[arg-type]


def test_minimum_scene_length_is_respected(make_video: MakeVideo) -> None:
    video = make_video(scenes=6, scene_seconds=0.8, size=(320, 180))
    assert len(detect_scenes(video, min_scene_len_s=0.5)) == 6
    scenes = detect_scenes(video, min_scene_len_s=1.0)
    # Shots shorter than the minimum are suppressed, not merged into one scene.
    assert 1 < len(scenes) < 6
    assert all(s.duration_s >= 1.0 - FRAME_S for s in scenes[:-1])


def test_video_without_cuts_is_one_whole_scene(make_video: MakeVideo) -> None:
    assert detect_scenes(make_video(scenes=1, scene_seconds=2.0, size=(320, 180))) == [Scene(0, 0.0, 2.0)]


def test_keyframes_avoid_dark_and_blurred_openings(sample_video: Path) -> None:
    scenes, keyframes = detect_scenes_and_keyframes(sample_video, max_side=None)
    assert [k.index for k in keyframes] == [s.index for s in scenes]
    for scene, keyframe in zip(scenes, keyframes, strict=True):
        assert scene.start_s <= keyframe.time_s < scene.end_s
        assert keyframe.image.size == (640, 360)
        assert 0.15 < keyframe.brightness < 0.9
        if scene.index > 0:  # odd scenes fade in from near-black, even ones come into focus
            assert (keyframe.time_s - scene.start_s) / scene.duration_s > OPENING_FRACTION


def test_keyframe_of_a_long_scene_stays_near_its_candidate_points(make_video: MakeVideo) -> None:
    # 150 analysed frames: the candidate pool thins itself several times, yet one candidate (50 %)
    # still lands within 1/32 of the scene (the pool's spacing) of the middle.
    video = make_video(scenes=1, scene_seconds=12.0, size=(320, 180))
    (scene,), (keyframe,) = detect_scenes_and_keyframes(video, candidates=1)
    assert keyframe.time_s == pytest.approx(scene.duration_s / 2, abs=scene.duration_s / 32)
    assert keyframe.image.size == (320, 180)  # never upscaled to max_side


def test_keyframes_can_be_scaled_while_decoding(sample_video: Path) -> None:
    _, keyframes = detect_scenes_and_keyframes(sample_video, max_side=320)
    assert {k.image.size for k in keyframes} == {(320, 180)}


def test_at_least_one_candidate_is_required(sample_video: Path) -> None:
    with pytest.raises(ValueError, match="candidates must be at least 1"):
        detect_scenes_and_keyframes(sample_video, candidates=0)


def test_thumbnails_are_small_deterministic_jpegs(make_video: MakeVideo) -> None:
    video = make_video(scenes=2, scene_seconds=0.6, size=(1280, 720))

    def digests() -> list[str]:
        _, keyframes = detect_scenes_and_keyframes(video)
        return [hashlib.sha256(make_thumbnail(k.image)).hexdigest() for k in keyframes]

    keyframe = detect_scenes_and_keyframes(video)[1][0]
    thumb = Image.open(io.BytesIO(make_thumbnail(keyframe.image)))
    assert (thumb.format, thumb.size) == ("JPEG", (480, 270))
    assert digests() == digests()


def test_thumbnail_never_upscales() -> None:
    assert Image.open(io.BytesIO(make_thumbnail(Image.new("RGB", (200, 100))))).size == (200, 100)


def test_contact_sheet_is_a_grid_of_images_or_jpegs() -> None:
    images: list[Image.Image | bytes] = [Image.new("RGB", (640, 360), "red")] * 4
    images += [make_thumbnail(Image.new("RGB", (640, 360), "blue"))] * 3
    sheet = Image.open(io.BytesIO(contact_sheet(images, columns=3, tile_width=100)))
    assert (sheet.format, sheet.size) == ("JPEG", (300, 3 * 56))


@pytest.mark.parametrize(
    ("count", "grid"), [(1, (1, 1)), (3, (3, 1)), (6, (6, 1)), (7, (4, 2)), (60, (6, 10))]
)
def test_contact_sheet_is_sized_to_the_scene_count(count: int, grid: tuple[int, int]) -> None:
    sheet = Image.open(io.BytesIO(contact_sheet([Image.new("RGB", (64, 36), "red")] * count, tile_width=64)))
    assert sheet.size == (grid[0] * 64, grid[1] * 36)


@pytest.fixture
def audio_only(tmp_path: Path) -> Path:
    path = tmp_path / "speech.mp4"
    with wave.open(str(tmp_path / "speech.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(bytes(1600))
    (tmp_path / "speech.wav").rename(path)
    return path


@pytest.mark.parametrize("bad", ["corrupt_video", "empty_video", "audio_only"])
@pytest.mark.parametrize("call", [probe_video, detect_scenes_and_keyframes])
def test_non_videos_raise_a_clear_invalid_video_error(
    bad: str, call: object, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(bad)
    with pytest.raises(
        InvalidVideoError, match=rf"'{path.name}' is not a video we can decode .*check the file"
    ):
        call(path)  # type: ignore[operator]
