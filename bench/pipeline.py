"""Pipeline stages bench: wall time per lib stage on one video, on embedded Postgres + storage.

    .venv/bin/python bench/pipeline.py [--scenes 20] [--scene-seconds 3] [--size 1280x720]
                                       [--checkpoint PATH] [--precision fp32|bf16] [--batch 32]

Runs register_video, extract_keyframes and embed_videos (local backend, through the embedding engine)
directly, in a temporary
HEIMDEX_HOME, and prints each stage's seconds and x realtime. One-time costs (services start, model load,
first forward pass) are paid and reported before the stages, so the stages show the steady state. Beside
the embedding stage it measures the raw encoder on the same thumbnails (decode first, then encode_tensors
in the same batches): the stage's images/s over that ceiling is what the pipeline around the model costs.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from _common import add_video_args, clip_env, isolated_home, load_note, sample_video, timed

from heimdex_clip_assets import services
from heimdex_clip_assets.adapters.clip_backends import LocalBackend
from heimdex_clip_assets.config import Settings
from heimdex_clip_assets.pipeline import embed, keyframes, register
from runpod_worker.encoder import ClipEncoder

DETECT_TARGET_X = 30.0
EMBED_TARGET_RATIO = 0.9


@contextmanager
def spy(obj: object, name: str, sink: list[float]) -> Iterator[None]:
    """Record the wall time of each ``obj.name(...)`` call in ``sink``, without changing what it does."""
    original: Callable[..., object] = getattr(obj, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - t0)

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        delattr(obj, name)  # the instance attribute goes; the class method shows through again


def batches(n: int, size: int) -> list[int]:
    return [min(size, n - start) for start in range(0, n, size)]


def warm(encoder: ClipEncoder, sizes: list[int]) -> None:
    """One forward pass per batch shape: the first call of a shape pays oneDNN's kernel setup."""
    for size in sorted(set(sizes)):
        encoder.encode_tensors(torch.zeros(size, 3, encoder.image_size, encoder.image_size))


def raw_rate(encoder: ClipEncoder, blobs: list[bytes], batch: int) -> tuple[float, float]:
    """(images/s of encode_tensors on already-decoded thumbnails, ms per image to decode them)."""
    tensors, decode_s = timed(lambda: torch.stack([encoder.decode(b) for b in blobs]))
    t0 = time.perf_counter()
    for start in range(0, len(blobs), batch):
        encoder.encode_tensors(tensors[start : start + batch])
    return len(blobs) / (time.perf_counter() - t0), 1000 * decode_s / len(blobs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_video_args(parser, scenes=20, scene_seconds=3.0)
    args = parser.parse_args()

    with isolated_home() as home:
        os.environ.update(clip_env(args, home))
        video, duration = sample_video(args, home)
        settings = Settings.from_env()
        print(f"torch_threads={torch.get_num_threads()} precision={args.precision} batch={args.batch}")
        print(load_note())

        (store, storage), start_s = timed(
            lambda: (services.vector_store(settings), services.storage(settings))
        )
        backend, load_s = timed(lambda: services.clip_backend(settings, storage))
        assert isinstance(backend, LocalBackend), backend
        encoder = backend.encoder
        print(f"one-time: services start {start_s:.2f} s, model load {load_s:.2f} s")

        stages: dict[str, float] = {}
        video_id, stages["register (sha256 + upload video)"] = timed(
            lambda: register.register_video(video, store=store, storage=storage, owner_id=settings.owner_id)
        )
        report, keyframes_wall = timed(
            lambda: keyframes.extract_keyframes(video_id, store=store, storage=storage)
        )
        t = report.timings_s
        stages["download video"] = t["download"]
        stages["decode + scene detection + keyframe choice"] = t["detect"]
        stages["thumbnails"] = t["thumbnails"]
        stages["upload thumbnails"] = t["upload"]
        stages["db (scene rows)"] = t["db"]
        # extract_keyframes' remainder: temp-dir cleanup, the contact sheet, re-reading the rows.
        stages["keyframes: other"] = keyframes_wall - sum(t.values())
        n = len(report.scenes)

        sizes = batches(n, args.batch)
        _, warm_s = timed(lambda: warm(encoder, sizes))
        blobs = [storage.download(storage.object_path(str(s.thumbnail_url))) for s in report.scenes]
        raw_before, decode_ms = raw_rate(encoder, blobs, args.batch)

        writes: list[float] = []
        with spy(store, "write_scene_embeddings", writes):
            report = embed.embed_videos([video_id], settings=settings, store=store, backend=backend)
        assert report.embedded == n and not report.failed and not report.cache_hits, report
        raw_after, _ = raw_rate(encoder, blobs, args.batch)
        # Per-image shares of each forward pass, in ms.
        encode_ms = float(np.mean([s.metadata["inference_time_ms"] for s in store.scenes(video_id)]))
        stages["embeddings (read + decode + encode)"] = report.wall_s - sum(writes)
        stages["db (embeddings)"] = sum(writes)

    total = sum(stages.values())
    print(f"scenes: {n} found, {args.scenes} made; first forward pass per shape {sizes}: {warm_s:.2f} s")
    print(f"{'stage':38s} {'seconds':>8s} {'share':>6s} {'x realtime':>11s}")
    for name, seconds in stages.items():
        x = duration / seconds if seconds > 0 else float("inf")
        print(f"{name:38s} {seconds:8.3f} {seconds / total:6.1%} {x:10.1f}x")
    print(f"{'total (steady state)':38s} {total:8.3f} {1:6.0%} {duration / total:10.1f}x")

    detect_x = duration / t["detect"]
    verdict = "ok" if detect_x >= DETECT_TARGET_X else "MISSED"
    print(
        f"scene detection + keyframe choice: {detect_x:.1f}x realtime "
        f"(target >= {DETECT_TARGET_X:g}x: {verdict})"
    )
    stage_rate = n / report.wall_s
    raw = (raw_before + raw_after) / 2
    print(
        f"embedding stage: {stage_rate:.1f} img/s (encode_bytes {encode_ms:.1f} ms/img incl. decode) | "
        f"raw encoder {raw:.1f} img/s (before {raw_before:.1f}, after {raw_after:.1f}; "
        f"decode {decode_ms:.1f} ms/img not included)"
    )
    ratio = stage_rate / raw
    verdict = "ok" if ratio >= EMBED_TARGET_RATIO else "MISSED"
    print(f"embedding stage / raw encoder: x{ratio:.2f} (target >= {EMBED_TARGET_RATIO:g}: {verdict})")
    print(load_note())


if __name__ == "__main__":
    main()
