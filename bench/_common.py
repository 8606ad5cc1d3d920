"""Helpers the pipeline benches share: an isolated state folder, a checkpoint, a sample video, timers."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Anything that would point the run at someone else's services or Dagster instance: unset, the
# embedded defaults under the temporary HEIMDEX_HOME take over (what a new user gets).
_SERVICE_VARS = (
    "DATABASE_URL",
    "SUPABASE_URL",
    "SUPABASE_SERVICE_ROLE_KEY",
    "DAGSTER_HOME",
    "DAGSTER_PG_URL",
    "DAGSTER_ARTIFACTS_DIR",
    "HEIMDEX_INBOX_DIR",
    "CLIP_MODEL_VERSION",
)


def add_video_args(parser: argparse.ArgumentParser, *, scenes: int, scene_seconds: float) -> None:
    parser.add_argument("--scenes", type=int, default=scenes, help=f"scenes in the video (default {scenes})")
    parser.add_argument("--scene-seconds", type=float, default=scene_seconds)
    parser.add_argument("--size", default="1280x720", help="video size, e.g. 1280x720")
    parser.add_argument("--checkpoint", help="weights file (default: CLIP_PRETRAINED, else random ViT-B-32)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="CLIP_PRECISION")
    parser.add_argument("--batch", type=int, default=32, help="CLIP_BATCH_SIZE")


@contextmanager
def isolated_home() -> Iterator[Path]:
    """A temporary HEIMDEX_HOME with embedded Postgres + storage, stopped and deleted on exit."""
    from heimdex_clip_assets import services
    from heimdex_clip_assets.config import Settings

    saved = dict(os.environ)
    # Short prefix: the embedded Postgres socket path must stay under the 107-byte limit.
    home = Path(tempfile.mkdtemp(prefix="hxb-"))
    for name in _SERVICE_VARS:
        os.environ.pop(name, None)
    os.environ["HEIMDEX_HOME"] = str(home)
    # The benches' videos (3 minutes of 720p: ~78 MB) are over the embedded server's standard-upload cap,
    # Supabase's 50 MB: like any file over 6 MiB they go up through resumable (TUS) uploads.
    os.environ.pop("HEIMDEX_STORAGE_FILE_SIZE_LIMIT", None)
    try:
        yield home
    finally:
        try:
            services.stop_embedded(Settings.from_env())
        finally:
            os.environ.clear()
            os.environ.update(saved)
            shutil.rmtree(home, ignore_errors=True)


def clip_env(args: argparse.Namespace, folder: Path) -> dict[str, str]:
    """Local-backend CLIP settings; makes a random-init ViT-B-32 when no weights are given (none can be
    downloaded here, and random weights cost the same compute as real ones)."""
    checkpoint = args.checkpoint or os.environ.get("CLIP_PRETRAINED")
    if not checkpoint:
        from heimdex_clip_assets.devservices.synthetic import random_checkpoint

        checkpoint = str(random_checkpoint(folder / "vit-b-32-random.safetensors"))
    return {
        "CLIP_INFERENCE_BACKEND": "local",
        "CLIP_MODEL_NAME": "ViT-B-32",
        "CLIP_PRETRAINED": checkpoint,
        "CLIP_PRECISION": args.precision,
        "CLIP_BATCH_SIZE": str(args.batch),
    }


def sample_video(args: argparse.Namespace, folder: Path) -> tuple[Path, float]:
    """The bench video (generated once per set of parameters and kept in ``HEIMDEX_BENCH_CACHE``, default
    ``$TMPDIR/heimdex-bench``: 3 minutes of 720p take a minute of both cores to encode), copied into
    ``folder``; returns its path and duration in seconds."""
    from heimdex_clip_assets.devservices.sample_video import generate_sample_video
    from heimdex_clip_assets.domain.scenes import probe_video

    width, height = (int(v) for v in args.size.lower().split("x"))
    name = f"bench-{args.scenes}x{args.scene_seconds:g}s-{width}x{height}.mp4"
    cache = Path(os.environ.get("HEIMDEX_BENCH_CACHE") or Path(tempfile.gettempdir()) / "heimdex-bench")
    cached = cache / name
    t0 = time.perf_counter()
    if not cached.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f".{name}.{os.getpid()}.partial.mp4"
        generate_sample_video(
            partial, scenes=args.scenes, scene_seconds=args.scene_seconds, size=(width, height)
        )
        partial.replace(cached)  # atomic: a bench started beside this one never reads half a file
    path = folder / name
    shutil.copyfile(cached, path)
    duration = probe_video(path).duration_s
    made_s = time.perf_counter() - t0
    print(f"video: {duration:.1f} s of {width}x{height} ({args.scenes} scenes), ready in {made_s:.1f} s")
    return path, duration


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()``'s result and its wall time in seconds."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def load_note() -> str:
    """1-minute load average against the core count: other jobs on the machine make numbers noisy."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return f"load avg {load:.2f} on {cores} cores" + (" (busy: numbers may be noisy)" if load > 0.5 else "")
