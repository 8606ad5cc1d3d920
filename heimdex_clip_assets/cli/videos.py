"""Commands on videos: add-video, process-video, demo."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from rich.table import Table

from heimdex_clip_assets import services
from heimdex_clip_assets.adapters.weights import WeightsUnavailableError
from heimdex_clip_assets.config import Settings, parse_user_id
from heimdex_clip_assets.pipeline import register

from .common import (
    STEP7_SQL,
    console,
    materialize_video,
    print_scenes,
    random_weights_note,
    require_weights,
    settings_from_args,
    video_id_arg,
)


def cmd_add_video(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    owner_id = parse_user_id(args.owner_id, "--owner-id") if args.owner_id else settings.owner_id
    store, storage = services.vector_store(settings), services.storage(settings)
    for path in args.paths:
        video_id = register.register_video(Path(path), store=store, storage=storage, owner_id=owner_id)
        console.print(f"{video_id}  {path}")
    console.print(
        "Registered. The sensor of `heimdex-clip dev` picks them up, or run "
        "`heimdex-clip process-video --video-id ID` now."
    )
    return 0


def cmd_process_video(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    video_id = video_id_arg(args.video_id)
    materialize_video(video_id, settings)
    print_scenes(settings, video_id)
    return 0


def _weights_or_random(args: argparse.Namespace) -> Settings:
    """The demo's settings: the configured weights when they can be had, else random weights.

    The demo exists to show the pipeline working on any machine, so unlike every other command it goes
    on without the weights, saying so in one line. The run's resources read the environment, hence the
    change there; the model version is derived again so random vectors never carry the real label.
    """
    settings = settings_from_args(args)
    try:
        require_weights(settings)
    except WeightsUnavailableError as exc:
        why = f"{settings.clip_pretrained}: {exc.reason}"
        os.environ["CLIP_PRETRAINED"] = "none"
        os.environ.pop("CLIP_MODEL_VERSION", None)
        settings = settings_from_args(args)
    else:
        if not random_weights_note(settings):
            return settings
        why = "CLIP_PRETRAINED=none"
    console.print(
        f"[yellow]Random CLIP weights[/yellow] ({why}): the whole pipeline runs, but its vectors mean "
        "nothing; set CLIP_PRETRAINED=<file> for real ones"
    )
    return settings


def cmd_demo(args: argparse.Namespace) -> int:
    from heimdex_clip_assets.devservices.sample_video import generate_sample_video

    settings = _weights_or_random(args)
    if args.video:
        video = Path(args.video)
    else:
        video = settings.home / "samples" / f"sample-{args.scenes}x{args.scene_seconds:g}s.mp4"
        if not video.exists():
            video.parent.mkdir(parents=True, exist_ok=True)
            console.print(f"Generating a sample 720p video with {args.scenes} scenes: {video}")
            generate_sample_video(video, scenes=args.scenes, scene_seconds=args.scene_seconds)
    started = time.perf_counter()
    # The model loads (~4 s, mostly imports) in a process of its own, on the core that hashing, uploading
    # and Dagster's start-up (all holding this process's GIL) leave idle.
    services.preload_encoder(settings, in_child=True)
    store, storage = services.vector_store(settings), services.storage(settings)
    video_id = register.register_video(video, store=store, storage=storage, owner_id=settings.owner_id)
    console.print(
        f"Video {video_id} registered; running scene_keyframes -> "
        f"scene_clip_embeddings (backend={settings.clip_backend})"
    )
    materialize_video(video_id, settings)
    wall = time.perf_counter() - started
    rows = store.query(STEP7_SQL, (video_id,))
    table = Table(title="Step 7: video_scenes", caption=random_weights_note(settings))
    for column in ("scene", "has_clip", "backend", "inference_ms"):
        table.add_column(column)
    for row in rows:
        ms = row["inference_ms"]
        table.add_row(
            str(row["index"]),
            str(row["has_clip"]).lower(),
            str(row["backend"]),
            f"{float(ms):.1f}" if ms is not None else "-",
        )
    console.print(table)
    video_rec = store.get_video(video_id)
    duration = video_rec.duration_s if video_rec and video_rec.duration_s else 0.0
    console.print(
        f"{len(rows)} scenes from {duration:.1f}s of video in {wall:.1f}s "
        f"({duration / wall if wall else 0:.1f}x realtime)"
    )
    return 0
